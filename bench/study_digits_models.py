"""Drop-in schedulers on several learned VP digits models, by Fréchet distance, and why the FD
ranking at 10-20 steps does not follow accuracy (the Tweedie part).

    python bench/study_digits_models.py --checkpoints vp ckpt_4000.pt ckpt_8000.pt [--samples 1000] [--commit]

The shipped VP model was trained for 2000 steps. The question this answers: does the ranking
measured on it (bench/study_digits_accuracy.py, docs/results.md "Drop-in schedulers") hold on
better-trained models of the same kind? Train them with

    fastint train --process vp --steps 8000 --threads 1 --out vp_train.pt   # checkpoints every 500 steps
    fastint train --resume vp_train.pt --steps 16000 --threads 1 --out vp_train.pt

(the learning rate is constant after warm-up, so the checkpoint at step s is the s-step model).

For each checkpoint, on the same prior draws (seed 0, the state at T = 1):
- the converged solution of the probability-flow ODE (DPM-Solver++ 3M, --converged trailing
  steps) and its FD;
- every contestant on 'trailing' timesteps at --steps, by FD (bench/study_dropin.py's loop,
  timestep map and model wrapper);
- the Tweedie part: the converged samples noised to t (fresh noise) and mapped to the x̂0
  prediction with one model call, by FD, for t in --tweedie-t. If x̂0 at t ~ 0.1 scores far below
  the converged samples, then a sampler whose last step is a jump to x̂0 from t ~ 0.1 (what the
  diffusers multistep schedulers do at 10 'trailing' steps) is rewarded by FD for that jump,
  whatever its integration error.

FD: fastint.metrics.frechet_distance to all 1797 digits in the shipped classifier's features.
With --commit the tables go to bench/results/study_digits_models.{md,json}.
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
FASTINT = [  # label -> ConjugateMultistepScheduler overrides (the first is the class defaults)
    ("fastint CMS (defaults)", {}),
    ("fastint CMS, x̂0 last step", {"final_step": "x0", "lower_final": True}),
    ("fastint CMS, predict x0, x̂0 last step", {"predict": "x0", "final_step": "x0"}),
    ("fastint CMS, predict x0, log-SNR, x̂0 last step", {"predict": "x0", "final_step": "x0", "interp": "logsnr"}),
    ("fastint CMS, solver_order=3", {"solver_order": 3}),
]


def contestants():
    by = {c.label: c for c in S.CONTESTANTS}
    out = [by[p] for p in PEERS]
    out += [S.Contestant(label, CMS, over, kind="fastint") for label, over in FASTINT]
    return out


def converged_run(con, cfg, model, init, steps, marks):
    """The converged 'trailing' run (the standard diffusers loop), with the states at the timesteps
    in ``marks`` (before the model call there) -> (x0, {timestep: state})."""
    sch, why = S.build_scheduler(con, cfg, "trailing")
    if sch is None:
        raise RuntimeError(why)
    sch.set_timesteps(steps)
    x, states = init.clone() * sch.init_noise_sigma, {}
    for t in sch.timesteps:
        if int(t) in marks:
            states[int(t)] = x.float().clone()
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x.float(), states


def tweedie_fd(net, sde, x, ts, real, seed=1):
    """FD of the x̂0 prediction of x noised to each t in ts (fresh noise from ``seed``)."""
    from fastint.metrics import frechet_distance
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = float(sde.alpha(tt)), float(sde.sigma(tt))
        z = a * x + s * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            eps = net(z, torch.full((x.shape[0],), float(t)))
        out[t] = frechet_distance((z - s * eps) / a, real)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["vp"], help="'vp' (shipped) and/or VP checkpoint paths")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--converged", type=int, default=100)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--tweedie-t", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    real = load_digits("all")[0]
    init = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    cons = contestants()
    converged_by = next(c for c in S.CONTESTANTS if c.label == "DPM-Solver++ 3M")
    results, t_start = [], time.perf_counter()
    for ck in args.checkpoints:
        loaded, cfg, tmap, model = S.learned_vp(ck)
        net, sde = loaded.model, loaded.sde
        steps_trained = (loaded.checkpoint.get("meta") or {}).get("step")
        runner = S.Runner(torch.float32)
        N = cfg["num_train_timesteps"]
        marks = {n: N // n - 1 for n in args.steps}  # the last 'trailing' knot of n steps
        conv_x, states = converged_run(converged_by, cfg, model, init, args.converged, set(marks.values()))
        jump = {}  # the converged state at the last knot of n steps, then one jump to x̂0
        for n, k in marks.items():
            if k in states:
                ab = float(sde.alpha(torch.tensor((k + 1) / N, dtype=torch.float64))) ** 2  # digits_config: ᾱ[k] = α((k+1)/N)²
                x = states[k]
                jump[str(n)] = frechet_distance((x - math.sqrt(1 - ab) * model(x, k)) / math.sqrt(ab), real)
        rec = {"checkpoint": os.path.basename(ck), "trained_steps": steps_trained, "converged_fd": frechet_distance(conv_x, real),
               "tweedie_fd": {str(t): v for t, v in tweedie_fd(net, sde, conv_x, args.tweedie_t, real).items()},
               "converged_then_jump_fd": jump, "fd": {}, "rms": {}}
        for con in cons:
            for n in args.steps:
                run, _ = runner.run(con, cfg, "trailing", model, init, n, tmap)
                key = str(n)
                if run is None or not torch.isfinite(run.x).all():
                    rec["fd"].setdefault(con.label, {})[key] = None
                    continue
                x = run.x.float()
                rec["fd"].setdefault(con.label, {})[key] = frechet_distance(x, real)
                rec["rms"].setdefault(con.label, {})[key] = float((x - conv_x).pow(2).mean().sqrt())
        results.append(rec)
        print(render([rec], args), flush=True)
    wall = time.perf_counter() - t_start
    md = render(results, args, wall)
    print(md)
    if args.commit:
        S.write_results("study_digits_models", md, {"args": vars(args), "results": results, "seconds": wall})


def render(results, args, wall=None):
    def cell(v):
        return "diverged" if v is None else f"{v:.3f}"

    lines = [f"# Drop-in schedulers on several learned VP digits models ({args.samples} samples, seed {args.seed}, "
             f"'trailing' timesteps)", ""]
    if wall is not None:
        lines += [f"`python bench/study_digits_models.py --checkpoints {' '.join(map(os.path.basename, args.checkpoints))} --samples "
                  f"{args.samples}`, {wall:.0f} s, 1 thread. FD to the 1797 digits (classifier features); RMS to "
                  f"the converged solution (DPM-Solver++ 3M, {args.converged} steps) in parentheses.", ""]
    for rec in results:
        name = os.path.basename(rec["checkpoint"]) + (f" ({rec['trained_steps']} training steps)" if rec["trained_steps"] else "")
        tw = ", ".join(f"t = {t}: {v:.3f}" for t, v in rec["tweedie_fd"].items())
        cj = ", ".join(f"{n} steps (from timestep {1000 // int(n) - 1}): {v:.3f}"
                       for n, v in rec["converged_then_jump_fd"].items())
        lines += [f"## {name}", "", f"Converged solution: FD **{rec['converged_fd']:.3f}**. Its samples noised to t "
                  f"and mapped to x̂0 (one call): {tw}. The converged ODE state at the last knot of n 'trailing' "
                  f"steps, then one jump to x̂0 (the peers' recipe, integrated exactly): {cj}.", "",
                  "| scheduler | " + " | ".join(f"{n} steps" for n in args.steps) + " |",
                  "|---|" + "---:|" * len(args.steps)]
        for label, row in rec["fd"].items():
            rms = rec["rms"].get(label, {})
            lines.append(f"| {label} | " + " | ".join(
                cell(row.get(str(n))) + (f" ({rms[str(n)]:.3f})" if str(n) in rms else "") for n in args.steps) + " |")
        best = {str(n): min((rec["fd"][p][str(n)] for p in PEERS if rec["fd"][p][str(n)] is not None),
                            default=math.inf) for n in args.steps}
        d = rec["fd"][FASTINT[0][0]]
        lines += ["", "Defaults over the best peer: " + ", ".join(
            f"{n} steps {d[str(n)] / best[str(n)]:.2f}" if d[str(n)] is not None else f"{n} steps diverged"
            for n in args.steps), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
