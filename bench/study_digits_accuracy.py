"""Accuracy against Fréchet distance on the shipped VP digits model, drop-in schedulers on identical
'trailing' timesteps: the RMS distance of each scheduler's samples to a converged solution of the
same ODE from the same draws (paired), beside the Fréchet distance of those samples to the real
digits. Writes bench/results/study_digits_accuracy.{md,json} with --commit.

    python bench/study_digits_accuracy.py [--samples 500] [--converged 200] [--steps 5 10 20] [--commit]

The converged solution is DPM-Solver++ 3M at --converged trailing steps (at 100 and 200 steps it
agrees with itself to far below the 20-step errors). Schedulers, the timestep map and the model
wrapper are bench/study_dropin.py's.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402

LABELS = ["DPM-Solver++ 2M", "DPM-Solver++ 3M", "UniPC bh2", "DEIS", "fastint CMS", "fastint CMS x0 final"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--converged", type=int, default=200, help="trailing steps of the converged DPM-Solver++ 3M run")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="vp", help="the VP denoiser: 'vp' (shipped) or a checkpoint path")
    p.add_argument("--commit", action="store_true")
    args = p.parse_args()
    if args.commit and args.checkpoint != "vp":
        p.error("--commit writes the shipped model's committed results: leave it out with --checkpoint")
    torch.set_num_threads(1)
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    _, cfg, tmap, model = S.learned_vp(args.checkpoint)
    real = load_digits("all")[0]
    init = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    runner = S.Runner(torch.float32)
    by = {c.label: c for c in S.CONTESTANTS}
    t0 = time.perf_counter()
    conv, _ = runner.run(by["DPM-Solver++ 3M"], cfg, "trailing", model, init, args.converged, tmap)
    conv_fd = frechet_distance(conv.x.float(), real)
    rows = []
    for n in args.steps:
        for label in LABELS:
            run, why = runner.run(by[label], cfg, "trailing", model, init, n, tmap)
            if run is None:
                rows.append({"steps": n, "label": label, "error": why})
                continue
            rms = float((run.x.float() - conv.x.float()).pow(2).mean().sqrt())
            rows.append({"steps": n, "label": label, "rms": rms, "fd": frechet_distance(run.x.float(), real)})
            print(f"{n:3d} {label:24s} RMS {rms:.4f}  FD {rows[-1]['fd']:.4f}", flush=True)
    wall = time.perf_counter() - t0
    lines = [f"# Accuracy vs Fréchet distance, VP digits model, 'trailing' timesteps ({args.samples} samples, "
             f"seed {args.seed})", "",
             f"`python bench/study_digits_accuracy.py --samples {args.samples} --converged {args.converged}`, "
             f"{wall:.0f} s, 1 thread. RMS: root-mean-square distance of the samples to the converged solution "
             f"from the same draws (DPM-Solver++ 3M, {args.converged} steps), whose own FD is **{conv_fd:.3f}**.",
             "", "| scheduler | " + " | ".join(f"{n} steps RMS | {n} steps FD" for n in args.steps) + " |",
             "|---|" + "---:|---:|" * len(args.steps)]
    for label in LABELS:
        cells = []
        for n in args.steps:
            r = next(r for r in rows if r["steps"] == n and r["label"] == label)
            cells += ["n/a", "n/a"] if "rms" not in r else [f"{r['rms']:.4f}", f"{r['fd']:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.commit:
        S.write_results("study_digits_accuracy", "\n".join(lines),
                        {"args": vars(args), "converged_fd": conv_fd, "rows": rows, "seconds": wall})


if __name__ == "__main__":
    main()
