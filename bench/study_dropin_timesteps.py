"""The drop-in on timesteps it is given: the README's VP Sampler recipe as a diffusers scheduler.

    python bench/study_dropin_timesteps.py [--seeds 0 1 2] [--samples 1000] [--commit]

The README's VP Sampler recommendation ends its model times at t = 0.1 and then jumps to x̂0. A
diffusers pipeline can give its scheduler the same knots through ``timesteps=`` (the pipeline's
``__call__(..., timesteps=...)``, which calls ``set_timesteps(timesteps=...)``):
``np.linspace(999, 99, n).round()``, with ``ConjugateMultistepScheduler(predict="x0",
interp="logsnr", final_step="x0", corrector=True)``. This runs that on the shipped VP digits
model, on the prior draws of bench/study_digits_seeds.py (seeds, 1000 samples), and compares with
the best peer on the same draws from bench/results/study_digits_seeds.json (DPM-Solver++ 2M/3M,
UniPC bh2, DEIS on the pipeline's 'trailing' timesteps, their best spacing here). With --commit:
bench/results/study_dropin_timesteps.{md,json}.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402
from study_digits_seeds import best_peer  # noqa: E402

OPTIONS = {"predict": "x0", "interp": "logsnr", "final_step": "x0", "corrector": True}
LAST_TIMESTEP = 99  # t = 0.1 on the digits config (ᾱ[k] = α((k + 1)/1000)²)


def knots(n, first=999, last=LAST_TIMESTEP):
    return np.linspace(first, last, n).round().astype(int).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--commit", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    from fastint.data import load_digits
    from fastint.diffusers import ConjugateMultistepScheduler
    from fastint.metrics import frechet_distance

    peers = json.load(open(os.path.join(HERE, "results", "study_digits_seeds.json")))
    if peers["args"]["samples"] != args.samples:
        raise SystemExit(f"the committed peers are on {peers['args']['samples']} samples; pass --samples to match")
    real = load_digits("all")[0]
    _, cfg, tmap, model = S.learned_vp("vp")
    fd, best, t0 = {}, {}, time.perf_counter()
    for seed in args.seeds:
        init = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for n in args.steps:
            with torch.no_grad():
                run = S.diffusers_loop(ConjugateMultistepScheduler.from_config(cfg, **OPTIONS), model, init, knots(n), tmap)
            fd.setdefault(str(seed), {})[str(n)] = frechet_distance(run.x.float(), real)
            best.setdefault(str(seed), {})[str(n)] = best_peer(peers["fd"], str(seed), str(n))
            print(seed, n, fd[str(seed)][str(n)], best[str(seed)][str(n)], flush=True)
    wall = time.perf_counter() - t0
    lines = [f"# The drop-in on the README's VP knots (timesteps=linspace(999, {LAST_TIMESTEP}, n)), shipped VP model", "",
             f"`python bench/study_dropin_timesteps.py --seeds {' '.join(map(str, args.seeds))} --samples {args.samples}`, "
             f"{wall:.0f} s, 1 thread. `ConjugateMultistepScheduler.from_config(cfg, {', '.join(f'{k}={v!r}' for k, v in OPTIONS.items())})`; "
             "the best peer (on 'trailing' timesteps, same draws) from bench/results/study_digits_seeds.json. "
             "Each cell: FD, then the ratio to the best peer.", "",
             "| seed | " + " | ".join(f"{n} steps" for n in args.steps) + " |", "|---|" + "---:|" * len(args.steps)]
    for seed in map(str, args.seeds):
        lines.append(f"| {seed} | " + " | ".join(
            f"{fd[seed][str(n)]:.3f} ({fd[seed][str(n)] / best[seed][str(n)]:.3f})" for n in args.steps) + " |")
    md = "\n".join(lines)
    print(md)
    if args.commit:
        S.write_results("study_dropin_timesteps", md, {"args": vars(args), "fd": fd, "best_peer": best, "seconds": wall})


if __name__ == "__main__":
    main()
