"""fastint.Sampler configurations on the shipped VP digits model, by Fréchet distance.

    python bench/study_sampler_digits.py                 # NFE 5 10 20, 500 digits, writes bench/results/study_sampler_digits.{json,md}
    python bench/study_sampler_digits.py --nfe 5 --batch 200 --out-dir /tmp/s

The learned-model half of choosing the README's Sampler recommendation (issue "Drop-in
schedulers that win on the pipeline's own timesteps", item 5): the same prior draws as
bench/study_dropin.py's digits part (torch.randn(batch, 1, 8, 8) from seed 0, the state at
T = 1), so its peer rows and these are on identical inputs; FD against all 1797 digits in the
shipped classifier's features (fastint.metrics.frechet_distance). Each configuration is a
label -> Sampler keyword arguments; nfe is the exact number of model calls.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# label -> Sampler kwargs (nfe added per run). "grid" may be a callable (sde, nfe) -> times.
CONFIGS = {
    "ddim, quadratic, denoise": dict(method="ddim", grid="quadratic"),
    "conj_ms k=2 +C logsnr, quadratic, denoise (old README)": dict(method="conj_ms", k=2, corrector="every",
                                                                   interp="logsnr", grid="quadratic"),
    "conj_ms k=3 logsnr, logsnr grid, denoise": dict(method="conj_ms", k=3, interp="logsnr", grid="logsnr"),
    "conj_ms k=2 logsnr, logsnr grid, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="logsnr"),
    "conj_ms k=2 logsnr, quadratic, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="quadratic"),
    "conj_ms k=2 logsnr lower_final, logsnr grid, denoise": dict(method="conj_ms", k=2, interp="logsnr",
                                                                 lower_final=True, grid="logsnr"),
    "conj_ms k=2 +inner logsnr, logsnr grid, denoise": dict(method="conj_ms", k=2, corrector="inner",
                                                           interp="logsnr", grid="logsnr"),
    "conj_ms k=2 sigma, logsnr grid, denoise": dict(method="conj_ms", k=2, interp="sigma", grid="logsnr"),
    "conj_ms k=2 logsnr, edm grid, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="edm"),
    "conj_ms k=2 logsnr, logsnr grid to 1e-4, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="logsnr",
                                                             t_eps=1e-4),
    "conj_ms k=2 logsnr, logsnr grid t_eps 3e-3, denoise": dict(method="conj_ms", k=2, interp="logsnr",
                                                                grid="logsnr", t_eps=3e-3),
    "ddim, uniform, denoise": dict(method="ddim", grid="uniform"),
    "conj_ms k=2, uniform, denoise": dict(method="conj_ms", k=2, grid="uniform"),
    "conj_ms k=2 logsnr, uniform, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="uniform"),
    "conj_ms k=3 logsnr, uniform, denoise": dict(method="conj_ms", k=3, interp="logsnr", grid="uniform"),
    "conj_ms k=3, uniform, denoise": dict(method="conj_ms", k=3, grid="uniform"),
    "conj_ms k=2 +inner, uniform, denoise": dict(method="conj_ms", k=2, corrector="inner", grid="uniform"),
    "conj_ms k=3 logsnr, quadratic, denoise": dict(method="conj_ms", k=3, interp="logsnr", grid="quadratic"),
    # t_eps = 1/nfe on the uniform grid: the model times of diffusers' 'trailing' spacing, then x0
    "ddim, uniform to 1/nfe, denoise": dict(method="ddim", grid="uniform", t_eps="1/nfe"),
    "conj_ms k=2, uniform to 1/nfe, denoise": dict(method="conj_ms", k=2, grid="uniform", t_eps="1/nfe"),
    "conj_ms k=2 logsnr, uniform to 1/nfe, denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="uniform",
                                                          t_eps="1/nfe"),
    "conj_ms k=3, uniform to 1/nfe, denoise": dict(method="conj_ms", k=3, grid="uniform", t_eps="1/nfe"),
    "conj_ms k=2 logsnr lower_final, uniform to 1/nfe, denoise": dict(method="conj_ms", k=2, interp="logsnr",
                                                                      lower_final=True, grid="uniform",
                                                                      t_eps="1/nfe"),
    "conj_ms k=2 logsnr, uniform to 1/(2 nfe), denoise": dict(method="conj_ms", k=2, interp="logsnr",
                                                              grid="uniform", t_eps="1/(2nfe)"),
    # the drop-in's FD option on the same knots: data prediction, log-SNR, the jump to x̂0 from the
    # last 'trailing' knot; with and without the corrector (bench/study_digits_seeds.py)
    "conj_ms k=2 predict x0 logsnr, uniform to 1/nfe, denoise": dict(method="conj_ms", k=2, predict="x0",
                                                                     interp="logsnr", grid="uniform", t_eps="1/nfe"),
    "conj_ms k=2 predict x0 logsnr +inner, uniform to 1/nfe, denoise": dict(method="conj_ms", k=2, predict="x0",
                                                                            interp="logsnr", corrector="inner",
                                                                            grid="uniform", t_eps="1/nfe"),
    # a fixed final time t = 0.1 (where the x̂0 of the converged samples scores best by FD,
    # bench/study_digits_models.py), then the denoising call
    "conj_ms k=2, uniform to 0.1, denoise": dict(method="conj_ms", k=2, grid="uniform", t_eps=0.1),
    "conj_ms k=3, uniform to 0.1, denoise": dict(method="conj_ms", k=3, grid="uniform", t_eps=0.1),
    "conj_ms k=2 predict x0, uniform to 0.1, denoise": dict(method="conj_ms", k=2, predict="x0", grid="uniform",
                                                            t_eps=0.1),
    # the drop-in's FD option ending at t = 0.1 (where the shipped model's Tweedie FD is lowest),
    # then the denoising call: the README's previous VP recommendation
    "conj_ms k=2 predict x0 logsnr +inner, uniform to 0.1, denoise (previous README)": dict(
        method="conj_ms", k=2, predict="x0", interp="logsnr", corrector="inner", grid="uniform", t_eps=0.1),
    # the same, its first model time one uniform step below T (grid="leading", as diffusers'
    # 'leading' spacing leaves out T): the README's VP recommendation, fastint.demo.RECOMMENDED_VP
    "conj_ms k=2 predict x0 logsnr +inner, leading to 0.1, denoise (README)": dict(
        method="conj_ms", k=2, predict="x0", interp="logsnr", corrector="inner", grid="leading", t_eps=0.1),
    "conj_ms k=2 predict x0 logsnr, uniform to 0.1, denoise": dict(method="conj_ms", k=2, predict="x0",
                                                                   interp="logsnr", grid="uniform", t_eps=0.1),
    "conj_ms k=2 predict x0 logsnr +inner, uniform to 0.075, denoise": dict(
        method="conj_ms", k=2, predict="x0", interp="logsnr", corrector="inner", grid="uniform", t_eps=0.075),
    "conj_ms k=2 predict x0 logsnr +inner, logsnr grid to 0.1, denoise": dict(
        method="conj_ms", k=2, predict="x0", interp="logsnr", corrector="inner", grid="logsnr", t_eps=0.1),
    # no denoising call: the last step integrated to t = 1e-5 (the drop-in's final_step="multistep");
    # the README's previous recommendation
    "conj_ms k=2, uniform to 1e-5, no denoise": dict(method="conj_ms", k=2, grid="uniform", t_eps=1e-5,
                                                     denoise=False),
    "conj_ms k=2 logsnr, uniform to 1e-5, no denoise": dict(method="conj_ms", k=2, interp="logsnr", grid="uniform",
                                                            t_eps=1e-5, denoise=False),
}
T_EPS_RULES = {"1/nfe": lambda nfe: 1.0 / nfe, "1/(2nfe)": lambda nfe: 0.5 / nfe}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default="vp", help="the VP denoiser: 'vp' (shipped) or a checkpoint path")
    ap.add_argument("--only", nargs="+", help="substring filters on configuration labels")
    ap.add_argument("--out-dir", help="default: bench/results for the shipped model, else /tmp/fastint_study_sampler_digits")
    args = ap.parse_args(argv)
    if args.out_dir is None:  # the committed results are the shipped model's
        args.out_dir = (os.path.join(ROOT, "bench", "results") if args.checkpoint == "vp"
                        else os.path.join("/tmp", "fastint_study_sampler_digits"))
    torch.set_num_threads(args.threads)
    import fastint
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance
    from fastint.models import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, process="vp")
    net, sde = loaded.model.eval(), loaded.sde
    real = load_digits("all")[0]
    init = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    res = {}
    t0 = time.perf_counter()
    for label, kw in CONFIGS.items():
        if args.only and not any(f.lower() in label.lower() for f in args.only):
            continue
        for nfe in args.nfe:
            try:
                kw_n = dict(kw)
                if isinstance(kw.get("t_eps"), str):
                    kw_n["t_eps"] = T_EPS_RULES[kw["t_eps"]](nfe)
                s = fastint.Sampler(sde, nfe=nfe, **kw_n)
                with torch.no_grad():
                    x = s.sample(net, init)
                fd = frechet_distance(x, real) if torch.isfinite(x).all() else math.inf
            except (ValueError, TypeError) as e:
                fd = None
                print(f"{label} nfe={nfe}: {e}")
            res.setdefault(label, {})[str(nfe)] = fd
            print(f"{label:60s} nfe {nfe:3d}: FD {fd}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "study_sampler_digits.json"), "w") as f:
        json.dump({"batch": args.batch, "seed": args.seed, "fd": res, "runtime_s": time.perf_counter() - t0}, f,
                  indent=1)
    lines = [f"# fastint.Sampler configurations on the VP digits model `{args.checkpoint}`, by FD", "",
             f"`python bench/study_sampler_digits.py --batch {args.batch} --seed {args.seed}"
             f"{'' if args.checkpoint == 'vp' else ' --checkpoint ' + os.path.basename(args.checkpoint)}`: {args.batch} prior "
             f"draws (the drop-in study's), FD to the 1797 digits in the classifier's features; nfe is the exact "
             f"number of model calls (with denoise, the last one maps to x̂0). "
             f"{time.perf_counter() - t0:.0f} s, {args.threads} thread(s).", "",
             "| Sampler configuration | " + " | ".join(f"{n} calls" for n in args.nfe) + " |",
             "|---|" + "---:|" * len(args.nfe)]
    for label, row in res.items():
        lines.append(f"| {label} | " + " | ".join("—" if row.get(str(n)) is None else f"{row[str(n)]:.3f}"
                                                 for n in args.nfe) + " |")
    with open(os.path.join(args.out_dir, "study_sampler_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
