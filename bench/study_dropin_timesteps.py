"""The recommended drop-in against each peer's best spacing, shipped VP digits model.

    python bench/study_dropin_timesteps.py [--seeds 0 1 2] [--samples 1000] [--jobs 2] [--reuse] [--commit]
        [--checkpoint vp|PATH] [--stem NAME] [--spacings knots ...] [--render]

The recommended drop-in, ``ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN)``
(fastint.demo: predict="x0", interp="logsnr", final_step="x0", corrector=True, last_timestep=99),
picks its own knots, the last n of n + 1 timesteps uniform from 999 down to 99
(``np.linspace(999, 99, n + 1)[1:].round()``), and jumps from there to x̂0. The README's VP
Sampler (fastint.demo.RECOMMENDED_VP, grid="leading", t_eps=0.1) calls the model at the same times
(to the 1/1000 rounding of integer timesteps) and runs here on the same draws. A scheduler that
picks its own spacing is compared with each peer at the peer's best spacing, so every peer
(DPM-Solver++ 2M/3M, UniPC bh2, DEIS) runs on

- ``trailing``, ``linspace``, ``leading`` and ``trailing`` + Karras sigmas (its config options), and
- ``knots``: the drop-in's own knots. DPM-Solver++ takes them through its public
  ``set_timesteps(timesteps=...)``; UniPC and DEIS have no such argument (UniPC's ``sigmas=`` is
  for flow sigmas only), so their ``set_timesteps(n)`` runs and its timesteps and model sigmas
  are then replaced by DPM-Solver's for those timesteps, keeping each class's own final sigma
  (DEIS's is sigma_min: it ends there, without the jump to x̂0; ``given_knots``; the script checks that this replacement reproduces DPM-Solver's own
  ``timesteps=`` path exactly).

On the prior draws of bench/study_digits_seeds.py (seeds, 1000 samples), every contestant on the
same draw (paired); FD to the 1797 digits (classifier features). ``--jobs`` runs seeds in that many
processes (1 thread each). ``--reuse`` takes the peers' runs from the committed JSON where it has
them (same samples; on their config spacings they do not depend on fastint, on the knots only
through last_timestep) and runs the rest. With
--commit: bench/results/study_dropin_timesteps.{md,json}.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402
from study_digits_seeds import PEERS  # noqa: E402

from fastint.demo import RECOMMENDED_DROPIN, RECOMMENDED_VP  # noqa: E402

LAST_TIMESTEP = RECOMMENDED_DROPIN["last_timestep"]  # t = 0.1 on the digits config: the Sampler's t_eps
SPACINGS = ["trailing", "linspace", "leading", "trailing+karras", "knots"]
OVERRIDES = {"trailing": {"timestep_spacing": "trailing"}, "linspace": {"timestep_spacing": "linspace"},
             "leading": {"timestep_spacing": "leading"},
             "trailing+karras": {"timestep_spacing": "trailing", "use_karras_sigmas": True},
             "knots": {"timestep_spacing": "trailing"}}
OURS = "fastint drop-in (recommended)"
SAMPLER = "fastint Sampler (README recommendation)"


def knots(n, first=999, last=LAST_TIMESTEP):
    """The recommended drop-in's timesteps (ConjugateMultistepScheduler's last_timestep rule)."""
    return np.linspace(first, last, n + 1)[1:].round().astype(int).tolist()


def given_knots(sch, ts):
    """Make ``sch.set_timesteps(n)`` step on the timesteps ``ts`` (n = len(ts)): its own
    set_timesteps runs, then its timesteps and model sigmas are DPM-Solver's for ``ts``; the last
    sigma keeps the class's own value (0 or sigma_min; a repeat of the last model sigma stays one)."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler.from_config(sch.config, final_sigmas_type="zero")
    ref.set_timesteps(timesteps=list(ts))
    own = sch.set_timesteps

    def set_timesteps(num_inference_steps, device=None):
        if num_inference_steps != len(ts):
            raise ValueError(f"given_knots: {len(ts)} knots, asked for {num_inference_steps}")
        own(num_inference_steps, device)
        repeat = len(sch.sigmas) > 1 and bool(sch.sigmas[-1] == sch.sigmas[-2])
        sigmas = ref.sigmas.clone()
        sigmas[-1] = sigmas[-2] if repeat else sch.sigmas[-1]  # the class's final sigma: 0, sigma_min or a repeat
        sch.sigmas = sigmas.to(sch.sigmas.dtype)
        sch.timesteps = ref.timesteps.clone().to(sch.timesteps.device)

    sch.set_timesteps = set_timesteps
    return sch


def check_given_knots(cfg):
    """given_knots on DPM-Solver++ itself reproduces its own set_timesteps(timesteps=...)."""
    from diffusers import DPMSolverMultistepScheduler

    for n in (5, 20):
        a = DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing")
        a.set_timesteps(timesteps=knots(n))
        b = given_knots(DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing"), knots(n))
        b.set_timesteps(n)
        if not (torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)):
            raise SystemExit("given_knots does not reproduce DPMSolverMultistepScheduler(timesteps=...)")


def run_seed(job):
    """FD of every (contestant, spacing, steps) on the draw of one seed -> (seed, fd); the entries
    of ``done`` (label -> steps -> FD) are kept, not rerun."""
    seed, samples, steps, done, ours_only, checkpoint, spacings = job
    torch.set_num_threads(1)
    from fastint import Sampler
    from fastint.data import load_digits
    from fastint.diffusers import ConjugateMultistepScheduler
    from fastint.metrics import frechet_distance

    real = load_digits("all")[0]
    loaded, cfg, tmap, model = S.learned_vp(checkpoint)
    by = {c.label: c for c in S.CONTESTANTS}
    init = torch.randn(samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    fd = {label: dict(per) for label, per in done.items()}

    def fd_of(x):
        return frechet_distance(x.float(), real) if bool(torch.isfinite(x).all()) else None

    def score(sch, n):
        with torch.no_grad():
            return fd_of(S.diffusers_loop(sch, model, init, n, tmap).x)

    for n in steps:
        fd.setdefault(OURS, {})[str(n)] = score(ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN), n)
        with torch.no_grad():
            fd.setdefault(SAMPLER, {})[str(n)] = fd_of(Sampler(loaded.sde, nfe=n, **RECOMMENDED_VP).sample(
                loaded.model.eval(), init))
    print(seed, OURS, fd[OURS], SAMPLER, fd[SAMPLER], flush=True)
    for label in [] if ours_only else PEERS:
        con = by[label]
        for sp in spacings:
            if all(str(n) in fd.get(f"{label} / {sp}", {}) for n in steps):
                continue  # reused
            for n in steps:
                sch = con.resolve().from_config(cfg, **{**OVERRIDES[sp], **con.overrides})
                if sp == "knots":
                    if label.startswith("DPM"):
                        n_or_ts = knots(n)  # its public timesteps= argument
                    else:
                        sch, n_or_ts = given_knots(sch, knots(n)), n
                else:
                    n_or_ts = n
                fd.setdefault(f"{label} / {sp}", {})[str(n)] = score(sch, n_or_ts)
            print(seed, label, sp, fd[f"{label} / {sp}"], flush=True)
    return seed, fd


def render(fd, args, wall):
    seeds, steps = [str(s) for s in args.seeds], [str(n) for n in args.steps]

    def best(seed, n, labels):
        vals = [(fd[seed][lab][n], lab) for lab in labels if fd[seed][lab][n] is not None]
        return min(vals) if vals else (math.inf, None)

    def ratio(a, b):
        return "—" if a is None or not math.isfinite(b) else f"{a / b:.3f}"

    def peer(b, lab, digits=3):
        return "—" if lab is None else f"{b:.{digits}f} ({lab})"

    spacings = getattr(args, "spacings", None) or SPACINGS
    peer_rows = [] if args.ours_only else [f"{p} / {sp}" for p in PEERS for sp in spacings]
    ck = getattr(args, "checkpoint", "vp")
    what = "shipped VP model" if ck == "vp" else f"VP model {os.path.basename(ck)}"
    title = (f"The recommended drop-in and Sampler from 5 to 50 steps, {what}: the blow-up check"
             if args.ours_only else f"The recommended drop-in against each peer's best spacing, {what}")
    lines = [f"# {title}", "",
             f"`python bench/study_dropin_timesteps.py --seeds {' '.join(seeds)} --samples {args.samples} "
             f"--jobs {args.jobs}{' --reuse' if args.reuse else ''}{' --ours-only' if args.ours_only else ''}"
             f"{' --steps ' + ' '.join(steps) if steps != ['5', '10', '20'] else ''}"
             f"{' --spacings ' + ' '.join(spacings) if spacings != SPACINGS else ''}"
             f"{'' if ck == 'vp' else ' --checkpoint ' + os.path.basename(ck)}"
             f"{' --stem ' + args.stem if getattr(args, 'stem', None) else ''}`, {wall:.0f} s, 1 thread per job"
             f"{' (peer runs reused from the previous commit of this file where it had them, on the same draws)' if args.reuse else ''}. "
             "Recommended drop-in: "
             f"`ConjugateMultistepScheduler.from_config(cfg, {', '.join(f'{k}={v!r}' for k, v in RECOMMENDED_DROPIN.items())})` "
             f"(its own knots: linspace(999, {LAST_TIMESTEP}, n + 1)[1:], then x̂0); README Sampler: "
             f"`Sampler(sde, nfe=n, {', '.join(f'{k}={v!r}' for k, v in RECOMMENDED_VP.items())})` (the same model "
             "times). Each peer on its config's spacings and on those knots (`knots`; method: this script's "
             f"docstring). FD to the 1797 digits; each cell: the FD on seeds {', '.join(seeds)}.", "",
             "| contestant / spacing | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for lab in [OURS, SAMPLER] + peer_rows:
        cells = [" / ".join("—" if fd[s][lab][n] is None else f"{fd[s][lab][n]:.3f}" for s in seeds) for n in steps]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if not peer_rows:
        return "\n".join(lines)
    lines += ["", "**The drop-in against the best peer at its best spacing**, per draw: the best peer's FD and "
              "(peer / spacing), then the drop-in's ratio to it (< 1: ahead). Spacings without `knots`: the "
              "peers' own options only.", "",
              "| seed | steps | best peer, all spacings | drop-in ratio | Sampler ratio | best peer, config spacings | "
              "drop-in ratio |", "|---|---:|---|---:|---:|---|---:|"]
    for s in seeds:
        for n in steps:
            ours = fd[s][OURS][n]
            b_all, l_all = best(s, n, peer_rows)
            b_cfg, l_cfg = best(s, n, [r for r in peer_rows if not r.endswith("/ knots")])
            lines.append(f"| {s} | {n} | {peer(b_all, l_all)} | {ratio(ours, b_all)} | "
                         f"{ratio(fd[s][SAMPLER][n], b_all)} | {peer(b_cfg, l_cfg)} | {ratio(ours, b_cfg)} |")
    # per contestant the mean over the draws: a per-draw minimum over twenty peer rows is biased
    # low by the spread of the draws, the best mean is not
    mean = {lab: {n: (sum(fd[x][lab][n] for x in seeds) / len(seeds)
                      if all(fd[x][lab][n] is not None for x in seeds) else math.inf) for n in steps}
            for lab in [OURS] + peer_rows}
    lines += ["", f"**Mean FD over the {len(seeds)} draws**: the drop-in, the peer row with the best mean (peer / "
              "spacing), and their ratio (< 1: ahead); then the same over the peers' own spacings only.", "",
              "| steps | drop-in | best peer row, all spacings | ratio | best peer row, config spacings | ratio |",
              "|---:|---:|---|---:|---|---:|"]
    for n in steps:
        m_all = min(((mean[r][n], r) for r in peer_rows), default=(math.inf, None))
        m_cfg = min(((mean[r][n], r) for r in peer_rows if not r.endswith("/ knots")), default=(math.inf, None))
        ours = mean[OURS][n]
        lines.append(f"| {n} | {ours:.4f} | {peer(*m_all, 4)} | {ratio(ours, m_all[0])} | "
                     f"{peer(*m_cfg, 4)} | {ratio(ours, m_cfg[0])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--commit", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep the peers' runs of the committed JSON (same samples; knots: same last_timestep)")
    p.add_argument("--checkpoint", default="vp", help="the VP denoiser: vp (shipped) or a checkpoint path")
    p.add_argument("--stem", default=None, help="results file name under bench/results (default "
                   "study_dropin_timesteps, with --ours-only study_dropin_sweep)")
    p.add_argument("--render", action="store_true",
                   help="rewrite bench/results/<stem>.md from its committed JSON (no runs)")
    p.add_argument("--spacings", nargs="+", choices=SPACINGS, default=SPACINGS,
                   help="the peers' spacings to run (default all)")
    p.add_argument("--ours-only", action="store_true",
                   help="the drop-in and the Sampler only (a sweep over steps): bench/results/study_dropin_sweep")
    args = p.parse_args()
    stem = args.stem or ("study_dropin_sweep" if args.ours_only else "study_dropin_timesteps")
    committed = os.path.join(HERE, "results", stem)
    if args.render:  # the md only: the JSON is its source
        data = json.load(open(committed + ".json"))
        md = render(data["fd"], argparse.Namespace(**data["args"]), data["seconds"])
        with open(committed + ".md", "w") as f:
            f.write(md + "\n")
        return print(md)
    torch.set_num_threads(1)
    if args.reuse and args.checkpoint != "vp":
        raise SystemExit("--reuse: the committed JSON is of the shipped model (--checkpoint vp)")
    check_given_knots(S.learned_vp(args.checkpoint)[1])
    done = {str(s): {} for s in args.seeds}
    if args.reuse:
        old = json.load(open(os.path.join(HERE, "results", "study_dropin_timesteps.json")))
        if old["args"]["samples"] != args.samples:
            raise SystemExit("--reuse: the committed JSON has another number of samples")
        # the peers' runs on the drop-in's knots are kept while the knot rule is the same (the
        # JSONs before this key was written used last_timestep 99)
        same_knots = old.get("last_timestep", 99) == LAST_TIMESTEP
        for s in done:
            done[s] = {lab: {n: v for n, v in per.items() if int(n) in args.steps}
                       for lab, per in old["fd"].get(s, {}).items()
                       if " / " in lab and (same_knots or not lab.endswith("/ knots")) and lab.split(" / ")[0] in PEERS}
    t0 = time.perf_counter()
    jobs = [(s, args.samples, args.steps, done[str(s)], args.ours_only, args.checkpoint, args.spacings)
            for s in args.seeds]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_seed, jobs)
    else:
        results = [run_seed(j) for j in jobs]
    wall = time.perf_counter() - t0
    fd = {str(seed): per for seed, per in results}  # fd[seed][label][steps]
    md = render(fd, args, wall)
    print(md)
    if args.commit:
        S.write_results(stem, md,
                        {"args": vars(args), "fd": fd, "seconds": wall, "last_timestep": LAST_TIMESTEP,
                         "dropin": RECOMMENDED_DROPIN, "sampler": RECOMMENDED_VP})


if __name__ == "__main__":
    main()
