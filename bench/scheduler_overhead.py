"""Scheduler overhead: median ms per whole sampling loop, fastint's schedulers against diffusers', interleaved.

One loop is what a pipeline's scheduler does for one image, with a model that costs nothing
(``eps`` is a fixed precomputed tensor):

    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(eps, t, scheduler.scale_model_input(x, t)).prev_sample

Schedulers (each made once with ``from_config(SD_CONFIG)`` and its defaults, outside the timing):
fastint ConjugateMultistepScheduler, diffusers DPMSolverMultistepScheduler and
UniPCMultistepScheduler, fastint DDIMScheduler and diffusers DDIMScheduler. SD_CONFIG is Stable
Diffusion's (scaled_linear 0.00085..0.012, steps_offset 1, no clipping) with trailing spacing.

Every round times each scheduler once, in an order that alternates (forward on even rounds,
reversed on odd), so that drift in the machine's load reaches all of them alike. The table gives
the median (and min) over rounds of one whole loop; the median of each part: set_timesteps, the
first two steps (where fastint builds its coefficient tables, one per history length) and the
steps after; and the ratio of each median to DPMSolverMultistep's (and of fastint DDIM to diffusers
DDIM). Python's gc is off inside a timed loop, and the objects made before the rounds are frozen,
so that collections between loops stay short.

    python bench/scheduler_overhead.py                       # 1 thread, 20 steps, 1x4x64x64, 200 rounds
    python bench/scheduler_overhead.py --shape 4,4,96,96 --steps 50 --out /tmp/overhead.json

bench/test_bench_scheduler.py times the same loops under pytest-benchmark (``make bench``).
"""
import argparse
import gc
import json
import platform
import statistics
import sys
import time

import torch

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="trailing", trained_betas=None)
REFERENCE = "diffusers DPMSolverMultistepScheduler"
PAIRS = {"fastint DDIMScheduler": "diffusers DDIMScheduler"}  # extra ratios: fastint row / diffusers row


def schedulers(config):
    import diffusers

    import fastint.diffusers as fd

    return {
        "fastint ConjugateMultistepScheduler": fd.ConjugateMultistepScheduler.from_config(config),
        "diffusers DPMSolverMultistepScheduler": diffusers.DPMSolverMultistepScheduler.from_config(config),
        "diffusers UniPCMultistepScheduler": diffusers.UniPCMultistepScheduler.from_config(config),
        "fastint DDIMScheduler": fd.DDIMScheduler.from_config(config),
        "diffusers DDIMScheduler": diffusers.DDIMScheduler.from_config(config),
    }


COLD = False  # --cold: empty fastint's table cache before every loop (each set_timesteps builds its table)


@torch.no_grad()
def one_loop(scheduler, x_T, eps, steps):
    """(final sample, seconds in set_timesteps, [seconds in each step]) of one loop."""
    clock = time.perf_counter
    if COLD:
        import fastint.table

        fastint.table._CACHE.clear()
    t0 = clock()
    scheduler.set_timesteps(steps)
    marks = [clock()]
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(eps, t, scheduler.scale_model_input(x, t)).prev_sample
        marks.append(clock())
    return x, marks[0] - t0, [b - a for a, b in zip(marks, marks[1:])]


def measure(scheds, shape, steps, rounds, warmup, log=print):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g) * 0.1
    names = list(scheds)
    for name in names:  # warm-up: imports, allocator, lazy caches; also a sanity check
        for _ in range(warmup):
            x = one_loop(scheds[name], x_T, eps, steps)[0]
        if x.shape != x_T.shape or not torch.isfinite(x).all():
            raise RuntimeError(f"{name}: the loop's output is not finite")
    raw = {n: {"total": [], "set_timesteps": [], "steps": []} for n in names}
    gc_was = gc.isenabled()
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: collections between loops stay short
    t_start = time.perf_counter()
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                gc.disable()
                _, ts, per_step = one_loop(scheds[name], x_T, eps, steps)
                if gc_was:
                    gc.enable()
                d = raw[name]
                d["set_timesteps"].append(ts)
                d["steps"].append(per_step)
                d["total"].append(ts + sum(per_step))
            if log and (r + 1) % max(1, rounds // 4) == 0:
                log(f"  round {r + 1}/{rounds} ({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    finally:
        gc.unfreeze()
        if gc_was:
            gc.enable()
    return raw


def summarize(raw, steps):
    ref = statistics.median(raw[REFERENCE]["total"]) if REFERENCE in raw else None
    rows = {}
    for name, d in raw.items():
        med = statistics.median(d["total"])
        per_step = [statistics.median(col) for col in zip(*d["steps"])]  # median over rounds, per step index
        rows[name] = {
            "median_ms": med * 1e3,
            "min_ms": min(d["total"]) * 1e3,
            "median_set_timesteps_ms": statistics.median(d["set_timesteps"]) * 1e3,
            "median_step_ms": [t * 1e3 for t in per_step],
            "steady_us_per_step": statistics.median(per_step[2:]) * 1e6 if len(per_step) > 2 else None,
            "ratio_to_dpmsolver": med / ref if ref else None,
        }
    for a, b in PAIRS.items():
        if a in rows and b in rows:
            rows[a]["ratio_to_" + b.split()[-1]] = rows[a]["median_ms"] / rows[b]["median_ms"]
    return rows


def table(rows, steps):
    def ms(v, w):
        return f"{v:{w}.3f}" if v is not None else f"{'-':>{w}s}"

    lines = [f"{'scheduler':38s} {'median ms':>9s} {'min ms':>7s} {'set_ts ms':>9s} {'step0 ms':>8s} "
             f"{'step1 ms':>8s} {'us/step':>8s} {'/ DPMSolver':>11s}"]
    for name, r in rows.items():
        st = r["median_step_ms"]
        ratio = f"{r['ratio_to_dpmsolver']:11.2f}" if r["ratio_to_dpmsolver"] is not None else f"{'-':>11s}"
        steady = f"{r['steady_us_per_step']:8.1f}" if r["steady_us_per_step"] is not None else f"{'-':>8s}"
        lines.append(f"{name:38s} {r['median_ms']:9.3f} {r['min_ms']:7.3f} {r['median_set_timesteps_ms']:9.3f} "
                     f"{ms(st[0] if st else None, 8)} {ms(st[1] if len(st) > 1 else None, 8)} {steady} {ratio}")
    for a, b in PAIRS.items():
        if a in rows and b in rows:
            lines.append(f"{a} / {b}: {rows[a]['median_ms'] / rows[b]['median_ms']:.2f}")
    lines.append(f"median ms: median over rounds of one whole loop (set_timesteps({steps}) + {steps} steps); "
                 f"set_ts, step0, step1: medians of its set_timesteps and first two steps (fastint builds a "
                 f"coefficient table in each step that first meets a new history length); us/step: median of "
                 f"the other steps")
    return "\n".join(lines)


def parse_shape(text):
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes ints like 1,4,64,64, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape needs at least 2 positive dims [B, C, ...], got {text!r}")
    return shape


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--steps", type=int, default=20, help="inference steps per loop (default 20)")
    ap.add_argument("--shape", type=parse_shape, default=(1, 4, 64, 64), help="sample shape (default 1,4,64,64)")
    ap.add_argument("--rounds", type=int, default=200, help="timed rounds, each scheduler once per round (default 200)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed loops per scheduler first (default 3)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--cold", action="store_true",
                    help="empty fastint's table cache before every loop: every set_timesteps builds its table")
    args = ap.parse_args(argv)
    global COLD
    COLD = args.cold
    if args.threads < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        ap.error("--threads, --steps, --rounds and --warmup must be >= 1")
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
    import diffusers

    scheds = schedulers(SD_CONFIG)
    print(f"shape {list(args.shape)} float32, {args.steps} steps, {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, diffusers {diffusers.__version__}",
          file=sys.stderr)
    raw = measure(scheds, args.shape, args.steps, args.rounds, args.warmup)
    rows = summarize(raw, args.steps)
    print(table(rows, args.steps))
    if args.out:
        out = {"config": SD_CONFIG, "shape": list(args.shape), "dtype": "float32", "steps": args.steps,
               "rounds": args.rounds, "warmup": args.warmup, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "diffusers": diffusers.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "results": rows, "raw_seconds": raw}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
