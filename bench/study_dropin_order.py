"""Which interpolation order the recommended drop-in should use at each step count, shipped VP
digits model, five draws.

    python bench/study_dropin_order.py [--seeds 0 1 2 3 4] [--samples 1000] [--jobs 2] [--steps ...]
        [--checkpoint vp|PATH] [--commit] [--stem NAME]

``ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN)`` (fastint.demo) with its
order changed, on the same knots (last_timestep=99) and the same draws:

- ``k2 + corrector``: solver_order=2 with the Adams–Moulton corrector (the recommendation before
  this study, order 3 from two predictions and a correction);
- ``k3``: solver_order=3, no corrector (a third-order explicit predictor, DPM-Solver++ 3M's form);
- ``k3, lower_final``: the same with the last steps using no more points than steps are left
  (below 15 steps only, as DPM-Solver's lower_order_final);
- ``k2``: solver_order=2, no corrector (DPM-Solver++ 2M's form), for scale.

FD of ``--samples`` prior samples per seed (the prior draws of bench/study_digits_seeds.py) to the
1797 digits, at 5 to 50 steps. ``--jobs`` runs seeds in that many processes (1 thread each).
With --commit: bench/results/<stem>.{md,json} (default study_dropin_order).
"""
import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402
from fastint.demo import RECOMMENDED_DROPIN  # noqa: E402

BASE = dict(RECOMMENDED_DROPIN, solver_order=2, corrector=True, lower_final=False, order3_below=0)
VARIANTS = {
    "k2 + corrector": BASE,
    "k3": dict(BASE, solver_order=3, corrector=False),
    "k3, lower_final": dict(BASE, solver_order=3, corrector=False, lower_final=True),
    "k2": dict(BASE, corrector=False),
}
STEPS = [5, 6, 8, 10, 12, 15, 20, 30, 50]


def run_seed(job):
    seed, samples, steps, checkpoint = job
    torch.set_num_threads(1)
    from fastint.data import load_digits
    from fastint.diffusers import ConjugateMultistepScheduler
    from fastint.metrics import frechet_distance

    real = load_digits("all")[0]
    _, cfg, tmap, model = S.learned_vp(checkpoint)
    init = torch.randn(samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, opt in VARIANTS.items():
        for n in steps:
            with torch.no_grad():
                x = S.diffusers_loop(ConjugateMultistepScheduler.from_config(cfg, **opt), model, init, n, tmap).x
            fd = frechet_distance(x.float(), real) if bool(torch.isfinite(x).all()) else float("nan")
            out.setdefault(name, {})[n] = round(float(fd), 4)
        print(f"seed {seed} {name}: {out[name]}", flush=True)
    return seed, out


def render(fd, args, wall):
    seeds = sorted(fd)
    cmd = (f"`python bench/study_dropin_order.py --seeds {' '.join(map(str, seeds))} --samples {args.samples} "
           f"--jobs {args.jobs} --steps {' '.join(map(str, args.steps))}"
           f"{'' if args.checkpoint == 'vp' else ' --checkpoint ' + os.path.basename(args.checkpoint)}`, {wall:.0f} s, 1 thread per job")
    what = "shipped VP model" if args.checkpoint == "vp" else f"VP model {os.path.basename(args.checkpoint)}"
    lines = [f"# The recommended drop-in's order at each step count, {what}", "",
             f"{cmd}. Variants of `ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN)` on its "
             "own knots (last_timestep=99, then x̂0), method: this script's docstring. FD to the 1797 digits, "
             f"{args.samples} samples per seed.", "",
             "**Mean FD over the seeds** (the best variant at each step count in bold):", "",
             "| variant | " + " | ".join(f"{n} steps" for n in args.steps) + " |",
             "|---|" + "---:|" * len(args.steps)]
    mean = {v: {n: sum(fd[s][v][n] for s in seeds) / len(seeds) for n in args.steps} for v in VARIANTS}
    for v in VARIANTS:
        cells = []
        for n in args.steps:
            best = min(mean[w][n] for w in VARIANTS)
            c = f"{mean[v][n]:.3f}"
            cells.append(f"**{c}**" if mean[v][n] == best else c)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "**Per seed** (" + " / ".join(f"seed {s}" for s in seeds) + "):", "",
              "| variant | " + " | ".join(f"{n} steps" for n in args.steps) + " |",
              "|---|" + "---:|" * len(args.steps)]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(" / ".join(f"{fd[s][v][n]:.3f}" for s in seeds)
                                              for n in args.steps) + " |")
    lines += ["", "**k3 / (k2 + corrector)** per seed (< 1: k3 ahead):", "",
              "| steps | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---:|" + "---:|" * len(seeds)]
    for n in args.steps:
        lines.append(f"| {n} | " + " | ".join(f"{fd[s]['k3'][n] / fd[s]['k2 + corrector'][n]:.3f}" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=STEPS)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--commit", action="store_true")
    p.add_argument("--stem", default="study_dropin_order", help="results file name under bench/results")
    p.add_argument("--checkpoint", default="vp", help="the VP denoiser: vp (shipped) or a checkpoint path")
    args = p.parse_args()
    t0 = time.perf_counter()
    jobs = [(s, args.samples, args.steps, args.checkpoint) for s in args.seeds]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        fd = dict(pool.map(run_seed, jobs, chunksize=1))
    md = render(fd, args, time.perf_counter() - t0)
    print(md)
    if args.commit:
        S.write_results(args.stem, md, {"seeds": fd, "variants": VARIANTS, "samples": args.samples})


if __name__ == "__main__":
    main()
