"""How much of the drop-in's Fréchet-distance gap to the peers on the shipped VP digits model is
the draw of the samples: the same contestants on several seeds.

    python bench/study_digits_seeds.py [--seeds 0 1 2] [--samples 1000] [--commit]

bench/study_digits_models.py compares the drop-in with DPM-Solver++ 2M/3M, UniPC bh2 and DEIS on
one draw (seed 0) of 1000 prior samples, 'trailing' timesteps (bench/study_dropin.py's loop,
timestep map and model wrapper). Here each seed is a fresh draw of the prior; every contestant
sees the same draw, so the per-seed comparison is paired, and the spread across seeds says which
differences a single draw can resolve. Contestants: the peers, the class defaults, the FD option
of docs/dropin.md (predict='x0', interp='logsnr', final_step='x0') and two variants of it (the
corrector; solver_order=3).
With --commit the tables go to bench/results/study_digits_seeds.{md,json}.
"""
import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402

CMS = "fastint.diffusers.ConjugateMultistepScheduler"
PEERS = ["DPM-Solver++ 2M", "DPM-Solver++ 3M", "UniPC bh2", "DEIS"]
FD_OPTION = {"predict": "x0", "interp": "logsnr", "final_step": "x0"}
FASTINT = [  # label -> ConjugateMultistepScheduler overrides
    ("fastint CMS (defaults)", {}),
    ("FD option: predict x0, log-SNR, x̂0 last step", FD_OPTION),
    ("FD option + corrector", {**FD_OPTION, "corrector": True}),
    ("FD option + solver_order=3", {**FD_OPTION, "solver_order": 3}),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--commit", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    real = load_digits("all")[0]
    _, cfg, tmap, model = S.learned_vp("vp")
    runner = S.Runner(torch.float32)
    by = {c.label: c for c in S.CONTESTANTS}
    cons = [by[p] for p in PEERS] + [S.Contestant(label, CMS, over, kind="fastint") for label, over in FASTINT]
    fd, t0 = {}, time.perf_counter()  # fd[label][seed][steps]
    for seed in args.seeds:
        init = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for con in cons:
            for n in args.steps:
                run, _ = runner.run(con, cfg, "trailing", model, init, n, tmap)
                ok = run is not None and bool(torch.isfinite(run.x).all())
                fd.setdefault(con.label, {}).setdefault(str(seed), {})[str(n)] = (
                    frechet_distance(run.x.float(), real) if ok else None)
            print(seed, con.label, fd[con.label][str(seed)], flush=True)
    wall = time.perf_counter() - t0
    md = render(fd, args, wall)
    print(md)
    if args.commit:
        S.write_results("study_digits_seeds", md, {"args": vars(args), "fd": fd, "seconds": wall})


def best_peer(fd, seed, n):
    """The smallest FD of PEERS on draw ``seed`` at ``n`` steps (``fd[label][seed][steps]``, str keys)."""
    vals = [fd[p][seed][n] for p in PEERS if fd[p][seed][n] is not None]
    return min(vals) if vals else math.inf


def render(fd, args, wall):
    seeds, steps = [str(s) for s in args.seeds], [str(n) for n in args.steps]

    lines = [f"# The shipped VP digits model on {len(seeds)} draws ({args.samples} samples each, 'trailing' timesteps)", "",
             f"`python bench/study_digits_seeds.py --seeds {' '.join(seeds)} --samples {args.samples}`, {wall:.0f} s, "
             "1 thread. FD to the 1797 digits (classifier features). Each cell: the FD on seeds "
             f"{', '.join(seeds)}; in brackets, the ratio to the best peer on the same draw (< 1: ahead).", "",
             "| scheduler | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for label, per_seed in fd.items():
        cells = []
        for n in steps:
            vals = [per_seed[s][n] for s in seeds]
            txt = " / ".join("diverged" if v is None else f"{v:.3f}" for v in vals)
            if label not in PEERS:
                txt += " (" + " / ".join("–" if v is None else f"{v / best_peer(fd, s, n):.3f}" for v, s in zip(vals, seeds)) + ")"
            cells.append(txt)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Best peer per draw: " + "; ".join(
        f"{n} steps " + " / ".join(f"{best_peer(fd, s, n):.3f}" for s in seeds) for n in steps) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
