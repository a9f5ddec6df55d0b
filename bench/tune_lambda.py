"""Grid search of lambda_ddim's lam (and b) per process and NFE on analytic Gaussian mixtures.

For every process (VP; PSLD and CLD with b = "identity" and b = "ones"), NFE in --nfes and lam
in --lams, run `lambda_ddim` (quadratic grid, denoise=True) from fixed prior draws on every
tuning mixture, and measure the mean endpoint error (L2 per sample, data part) against the
float64 DOP853 solution of the PF-ODE followed by exact Tweedie denoising. The score of a
(process, b, NFE, lam) cell is the geometric mean over mixtures of err(lam) / err(lam = 0),
i.e. the error relative to ddim. The tuned value is the cell's argmin among the lam whose
worst tuning mixture is at most WORST_CAP times ddim's error (lam = 0 always qualifies), so
that a default never trades a large loss on one mixture for gains on the others, and whose
error on every tuning mixture is at most ABS_CAP (where no lam gets there, no sampler is usable
at that NFE and the default stays ddim); a held-out mixture set, not used in the search, checks
it afterwards.

    python bench/tune_lambda.py                      # full search (a few minutes on 2 cores)
    python bench/tune_lambda.py --quick              # smoke run
    python bench/tune_lambda.py --nfes 3 5 --stem lambda_tuning_low_nfe   # the NFE 1-7 range

Writes bench/results/lambda_tuning.json and bench/results/lambda_tuning.md. The values in
fastint/tuning.py are copied from this output (docs/tuning.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastint
from fastint.models import GaussianMixture, reference_solution, tweedie_reference

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - progress bar is optional
    def tqdm(it, **_):
        return it

F64 = torch.float64
T_EPS = 1e-3
DEFAULT_LAMS = [-2.0, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0]
DEFAULT_NFES = [10, 20, 50, 100, 200]
WORST_CAP = 1.0  # a tuned lam may not be worse than ddim on any tuning mixture (1.25 was tried: held-out NFE 10 got worse)
# ... nor have an endpoint error above 10x the data scale (~1.5) on any of them: at NFE 3-5 on
# PSLD/CLD every lam diverges (errors 1e3-1e5), and a ratio of two blow-ups is not a tuning signal
ABS_CAP = 15.0
CONFIGS = [("VPSDE", "identity"), ("PSLD", "identity"), ("PSLD", "ones"), ("CLD", "identity"), ("CLD", "ones")]

# (name, K modes, data dim, mean spread, component std, seed). Means: K points drawn N(0, I)
# and scaled to spread/sqrt(dim) per coordinate (2-D "ring" mixtures lie on a circle instead).
TUNING_MIXTURES = [
    ("ring8-d2", 8, 2, 1.5, 0.15, 0),
    ("blob3-d2", 3, 2, 1.0, 0.40, 1),
    ("far4-d8", 4, 8, 2.5, 0.10, 2),
    ("rand8-d8", 8, 8, 1.5, 0.15, 3),
    ("rand16-d32", 16, 32, 1.5, 0.20, 4),
    ("pair2-d32", 2, 32, 3.0, 0.05, 5),
]
HELDOUT_MIXTURES = [
    ("rand5-d16", 5, 16, 2.0, 0.25, 101),
    ("ring6-d2", 6, 2, 1.2, 0.10, 102),
    ("rand12-d4", 12, 4, 1.8, 0.30, 103),
]


def make_mixture(sde, spec):
    """The GaussianMixture of a spec tuple (deterministic in its seed)."""
    _, k, dim, spread, std, seed = spec
    g = torch.Generator().manual_seed(seed)
    if spec[0].startswith("ring"):
        ang = torch.arange(k, dtype=F64) * (2 * math.pi / k)
        means = spread * torch.stack([ang.cos(), ang.sin()], 1)
    else:
        means = torch.randn(k, dim, generator=g, dtype=F64) * (spread / math.sqrt(dim))
    stds = torch.full((k,), std, dtype=F64) * (0.75 + 0.5 * torch.rand(k, generator=g, dtype=F64))
    weights = torch.rand(k, generator=g, dtype=F64) + 0.5
    return GaussianMixture(sde, means, stds, weights)


def make_problem(sde, spec, n_samples, seed=1):
    """(model, zT float64, exact denoised data part) for one process and mixture."""
    model = make_mixture(sde, spec)
    zT = sde.prior_sample((n_samples, *model.data_shape), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z_eps = reference_solution(model, sde, zT, t_eps=T_EPS)
    x_ref = sde.data_part(tweedie_reference(model, sde, z_eps, T_EPS))
    return model, zT, x_ref


def endpoint_error(sde, problem, nfe, **options):
    """Mean over samples of the L2 endpoint error of lambda_ddim (inf on a blow-up)."""
    model, zT, x_ref = problem
    s = fastint.Sampler(sde, "lambda_ddim", nfe=nfe, grid="quadratic", t_eps=T_EPS, denoise=True, **options)
    x = s.sample(model, zT.float()).double()
    err = float((x - x_ref).flatten(1).norm(dim=1).mean())
    return err if math.isfinite(err) else math.inf


def geomean(xs):
    xs = list(xs)
    if any(not math.isfinite(x) for x in xs):
        return math.inf
    return math.exp(sum(math.log(max(x, 1e-300)) for x in xs) / len(xs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nfes", type=int, nargs="+", default=DEFAULT_NFES)
    ap.add_argument("--lams", type=float, nargs="+", default=DEFAULT_LAMS)
    ap.add_argument("--samples", type=int, default=32, help="prior draws per mixture")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="2 mixtures, NFE 10 and 50, 5 lams: a smoke run")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--stem", help="output file name stem (default lambda_tuning, or lambda_tuning_quick); "
                    "e.g. lambda_tuning_low_nfe for a run at --nfes 3 5")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mixtures, heldout = TUNING_MIXTURES, HELDOUT_MIXTURES
    if args.quick:
        args.nfes, args.lams = [10, 50], [-1.0, 0.0, 0.5, 1.0, 2.0]
        mixtures, heldout = mixtures[:2], heldout[:1]
    if 0.0 not in args.lams:
        args.lams = sorted(args.lams + [0.0])
    t0 = time.perf_counter()

    procs = {"VPSDE": fastint.VPSDE(), "PSLD": fastint.PSLD(), "CLD": fastint.CLD()}
    problems, heldout_problems = {}, {}
    for pname, sde in tqdm(procs.items(), desc="DOP853 references"):
        problems[pname] = [make_problem(sde, m, args.samples) for m in mixtures]
        heldout_problems[pname] = [make_problem(sde, m, args.samples, seed=7) for m in heldout]
    t_ref = time.perf_counter() - t0

    # errors[config][nfe][lam] = [err per mixture]
    cells = [(p, b, n, lam) for p, b in CONFIGS for n in args.nfes for lam in args.lams]
    errors = {}
    for p, b, n, lam in tqdm(cells, desc="grid"):
        sde = procs[p]
        errs = [endpoint_error(sde, pr, n, lam=lam, b=b) for pr in problems[p]]
        errors.setdefault(f"{p}/{b}", {}).setdefault(str(n), {})[repr(lam)] = errs

    results = []
    for p, b in CONFIGS:
        key = f"{p}/{b}"
        for n in args.nfes:
            row = errors[key][str(n)]
            base = row[repr(0.0)]
            ratios = {lam: geomean(e / b0 for e, b0 in zip(row[repr(lam)], base)) for lam in args.lams}
            worst = {lam: max(e / b0 for e, b0 in zip(row[repr(lam)], base)) for lam in args.lams}
            safe = [lam for lam in args.lams
                    if (worst[lam] <= WORST_CAP and max(row[repr(lam)]) <= ABS_CAP) or lam == 0.0]
            best = min(safe, key=lambda lam: (ratios[lam], abs(lam)))
            per_mix_best = [min(args.lams, key=lambda lam, i=i: row[repr(lam)][i]) for i in range(len(mixtures))]
            per_mix_ratio = [row[repr(best)][i] / base[i] for i in range(len(mixtures))]
            results.append(dict(process=p, b=b, nfe=n, best_lam=best, gain=ratios[best],
                                ddim_err_geomean=geomean(base), best_err_geomean=geomean(row[repr(best)]),
                                ratio_by_lam={repr(lam): ratios[lam] for lam in args.lams},
                                worst_ratio_by_lam={repr(lam): worst[lam] for lam in args.lams},
                                per_mixture_best_lam=per_mix_best, per_mixture_ratio_at_best=per_mix_ratio))

    # the tuned default per (process, NFE): the better b, then its lam
    tuned = {}
    for p in procs:
        for n in args.nfes:
            cand = [r for r in results if r["process"] == p and r["nfe"] == n]
            r = min(cand, key=lambda r: (r["gain"], r["b"] != "identity"))
            tuned.setdefault(p, []).append(dict(nfe=n, lam=r["best_lam"], b=r["b"], gain=r["gain"],
                                                lam_by_b={c["b"]: c["best_lam"] for c in cand}))

    # held-out check of the tuned (lam, b) against ddim
    held = []
    for p, rows in tqdm(tuned.items(), desc="held-out"):
        for t in rows:
            for spec, pr in zip(heldout, heldout_problems[p]):
                e0 = endpoint_error(procs[p], pr, t["nfe"], lam=0.0, b="identity")
                e1 = endpoint_error(procs[p], pr, t["nfe"], lam=t["lam"], b=t["b"])
                held.append(dict(process=p, nfe=t["nfe"], mixture=spec[0], lam=t["lam"], b=t["b"],
                                 ddim_err=e0, tuned_err=e1, ratio=e1 / e0))

    runtime = time.perf_counter() - t0
    meta = dict(script="bench/tune_lambda.py", argv=sys.argv[1:], quick=args.quick, samples=args.samples,
                nfes=args.nfes, lams=args.lams, grid="quadratic", denoise=True, t_eps=T_EPS,
                metric="geometric mean over mixtures of mean-L2 endpoint error relative to lam=0 (ddim)",
                worst_cap=WORST_CAP, abs_cap=ABS_CAP,
                tuning_mixtures=[dict(zip(("name", "K", "dim", "spread", "std", "seed"), m)) for m in mixtures],
                heldout_mixtures=[dict(zip(("name", "K", "dim", "spread", "std", "seed"), m)) for m in heldout],
                runtime_s=round(runtime, 1), reference_s=round(t_ref, 1), threads=args.threads,
                torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("lambda_tuning_quick" if args.quick else "lambda_tuning")
    (args.out / f"{stem}.json").write_text(json.dumps(
        dict(meta=meta, results=results, tuned=tuned, heldout=held, errors=errors), indent=1))
    md = render_markdown(meta, results, tuned, held, args.lams)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / stem}.json/.md in {runtime:.0f} s")


def _fmt(x):
    return "inf" if not math.isfinite(x) else f"{x:.3g}"


def render_markdown(meta, results, tuned, held, lams):
    out = [f"<!-- generated by {meta['script']} ({meta['runtime_s']} s); do not edit by hand -->", ""]
    out += ["### Tuned defaults (best b, then its lam)", "",
            "| process | NFE | b | lam | error / ddim (geo-mean, tuning set) | lam by b |", "|---|---|---|---|---|---|"]
    for p, rows in tuned.items():
        for t in rows:
            lb = ", ".join(f"{b}: {lam:g}" for b, lam in t["lam_by_b"].items())
            out.append(f"| {p} | {t['nfe']} | {t['b']} | {t['lam']:g} | {_fmt(t['gain'])} | {lb} |")
    out += ["", "### Error relative to ddim, geometric mean over the tuning mixtures", "",
            "| process/b | NFE | ddim error | " + " | ".join(f"λ={lam:g}" for lam in lams) + " |",
            "|---|---|---|" + "---|" * len(lams)]
    for r in results:
        cells = []
        for lam in lams:
            v = _fmt(r["ratio_by_lam"][repr(lam)])
            cells.append(f"**{v}**" if lam == r["best_lam"] else v)
        out.append(f"| {r['process']}/{r['b']} | {r['nfe']} | {_fmt(r['ddim_err_geomean'])} | " + " | ".join(cells) + " |")
    out += ["", "### Spread across mixtures at the chosen lam", "",
            "| process/b | NFE | lam | best lam per mixture | error/ddim per mixture |", "|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['process']}/{r['b']} | {r['nfe']} | {r['best_lam']:g} | "
                   + ", ".join(f"{x:g}" for x in r["per_mixture_best_lam"]) + " | "
                   + ", ".join(_fmt(x) for x in r["per_mixture_ratio_at_best"]) + " |")
    out += ["", "### Held-out mixtures (not in the search): tuned default vs ddim", "",
            "| process | NFE | mixture | lam, b | ddim error | tuned error | ratio |", "|---|---|---|---|---|---|---|"]
    for h in held:
        out.append(f"| {h['process']} | {h['nfe']} | {h['mixture']} | {h['lam']:g}, {h['b']} | {_fmt(h['ddim_err'])} | "
                   f"{_fmt(h['tuned_err'])} | {_fmt(h['ratio'])} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
