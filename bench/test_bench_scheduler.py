"""Scheduler overhead: the scheduler's own time for a whole sampling loop, fastint against diffusers.

Run with ``make bench`` (``pytest bench --benchmark-only``; never part of the default test run).

Each round times, on a state of shape ``SHAPE`` (1x4x64x64 float32, Stable Diffusion's latent):

    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(eps, t, scheduler.scale_model_input(x, t)).prev_sample

where ``eps`` is a fixed precomputed tensor (the model costs nothing), so what is timed is the
scheduler's own cost: its set_timesteps (fastint: the knots; the coefficient tables are built
inside the first steps, once per history length, so they are inside the timing too) and its
``STEPS`` updates. The schedulers are made once per test with ``from_config(SD_CONFIG)`` and their
defaults (diffusers' DPMSolverMultistep: DPM-Solver++ 2M; UniPC: bh2, order 2; fastint's
ConjugateMultistep: conj_ms, order 2, DEIS tAB), outside the timing.

All rows are one pytest-benchmark group, side by side; the summary (bench/conftest.py) prints the
min and median per step. One torch thread: on a 16K-element state the loop is host-bound.
``bench/scheduler_overhead.py`` measures the same loops interleaved in one process.
"""
import pytest
import torch

STEPS = 20
SHAPE = (1, 4, 64, 64)
THREADS = 1
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="trailing", trained_betas=None)

# diffusers' own np.array(torch tensor) in set_timesteps, under numpy 2 (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

IMPLS = {  # row name -> (module, class)
    "fastint ConjugateMultistepScheduler": ("fastint.diffusers", "ConjugateMultistepScheduler"),
    "diffusers DPMSolverMultistepScheduler": ("diffusers", "DPMSolverMultistepScheduler"),
    "diffusers UniPCMultistepScheduler": ("diffusers", "UniPCMultistepScheduler"),
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


def make_scheduler(impl):
    import importlib

    module, cls = IMPLS[impl]
    return getattr(importlib.import_module(module), cls).from_config(SD_CONFIG)


def scheduler_loop(scheduler, shape=SHAPE, steps=STEPS, scale=True):
    """run() -> final sample of one whole loop, set_timesteps included; the model is a fixed tensor.
    ``scale=False``: no scale_model_input (flow pipelines do not call it; FlowMatch classes lack it)."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g) * 0.1

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(eps, t, scheduler.scale_model_input(x, t) if scale else x).prev_sample
        return x
    return run


def record(benchmark, bench_results, name, steps):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # benchmarks disabled: nothing was timed
        bench_results.append((benchmark.group, name, stats.stats.min, stats.stats.median, steps))
        benchmark.extra_info["ms/loop"] = stats.stats.min * 1e3
        benchmark.extra_info["us/step"] = stats.stats.min / steps * 1e6


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scheduler_loop(benchmark, bench_results, one_thread, impl):
    pytest.importorskip("diffusers")
    run = scheduler_loop(make_scheduler(impl))
    run()  # first call: imports, allocator, lazy caches
    benchmark.group = f"scheduler loop x{STEPS} {list(SHAPE)} fp32, SD trailing, {one_thread} thr"
    out = benchmark(run)
    assert out.shape == SHAPE and torch.isfinite(out).all()
    record(benchmark, bench_results, impl, STEPS)


# Flow matching: SD3's scheduler config (shift 3), 28 steps, on SD3's latent shape (1x16x128x128).
FLOW_STEPS = 28
FLOW_SHAPE = (1, 16, 128, 128)
FLOW_IMPLS = {
    "fastint FlowMatchConjugateScheduler": lambda: __import__("fastint.diffusers", fromlist=["x"])
    .FlowMatchConjugateScheduler(shift=3.0),
    "diffusers FlowMatchEulerDiscreteScheduler": lambda: __import__("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0),
    "diffusers UniPCMultistepScheduler (flow)": lambda: __import__("diffusers").UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    "diffusers DPMSolverMultistepScheduler (flow)": lambda: __import__("diffusers").DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
}


@pytest.mark.parametrize("impl", list(FLOW_IMPLS))
def test_flow_scheduler_loop(benchmark, bench_results, one_thread, impl):
    """The same loop for the flow-matching schedulers (the model's velocity is a fixed tensor)."""
    pytest.importorskip("diffusers")
    run = scheduler_loop(FLOW_IMPLS[impl](), shape=FLOW_SHAPE, steps=FLOW_STEPS, scale=False)
    run()
    benchmark.group = f"flow scheduler loop x{FLOW_STEPS} {list(FLOW_SHAPE)} fp32, SD3 shift 3, {one_thread} thr"
    out = benchmark(run)
    assert out.shape == FLOW_SHAPE and torch.isfinite(out).all()
    record(benchmark, bench_results, impl, FLOW_STEPS)
