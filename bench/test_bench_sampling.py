"""End-to-end sampling overhead: time per step of fastint's loop against diffusers' DDIMScheduler loop.

Run with ``make bench`` (``pytest bench --benchmark-only``). Both loops do the same work on the
same VP (DDPM-schedule) state: ``steps`` model calls, each followed by one DDIM update.

- ``fastint``: ``Sampler(VPSDE.ddpm(), "ddim" | "sddim", grid=ddim_times(steps)).sample(model, zT)``
  on DDIMScheduler's own timesteps, its last step to ᾱ = 1 as the x̂0 row (table built once,
  outside the timing, like the scheduler's ``set_timesteps``);
- ``diffusers``: ``for t in scheduler.timesteps: x = scheduler.step(model(x, t), t, x).prev_sample``
  with ``DDIMScheduler(clip_sample=False)`` (eta = 0, or eta = 1 with a torch.Generator for the
  stochastic rows).

Models: ``const`` returns a fixed tensor (no work: the loop's own cost per step is what is
timed), and, when ``fastint.models.ContinuousUNet`` exists, a small ContinuousUNet (the loop's
cost next to a real network's). The summary (bench/conftest.py) prints microseconds per step.
"""
import pytest
import torch

import fastint
from fastint import Sampler, VPSDE

STEPS = 20
SHAPES = {"4K": (1, 4, 32, 32), "1M": (64, 4, 64, 64)}


class ConstModel(torch.nn.Module):
    """eps = a fixed tensor: a model that costs nothing."""

    def __init__(self, shape):
        super().__init__()
        self.eps = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1

    def forward(self, z, t):
        return self.eps


def ddim_times(steps, n_train=1000):
    """The model times of DDIMScheduler's default ('leading') timesteps k, t = (k + 1)/N (the knot
    of VPSDE.ddpm that holds ᾱ_k); its last step, to ᾱ = 1 (set_alpha_to_one), is the x̂0 row."""
    ratio = n_train // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio / n_train + 1 / n_train


def fastint_loop(model, zT, stochastic, steps=STEPS):
    sampler = Sampler(VPSDE.ddpm(), "sddim" if stochastic else "ddim", grid=ddim_times(steps), denoise=True,
                      **({"eta": 1.0} if stochastic else {}))
    sampler.sample(model, zT)  # device tables made once

    def run():
        return sampler.sample(model, zT, generator=torch.Generator().manual_seed(0))
    return run


def diffusers_loop(model, zT, stochastic, steps=STEPS):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, prediction_type="epsilon")
    sch.set_timesteps(steps)
    eta = 1.0 if stochastic else 0.0

    @torch.no_grad()
    def run():
        g = torch.Generator().manual_seed(0)
        x = zT
        for t in sch.timesteps:
            eps = model(x, t.expand(x.shape[0]).float() / 1000)
            x = sch.step(eps, t, x, eta=eta, generator=g if stochastic else None).prev_sample
        return x
    return run


def record(benchmark, bench_results, name, steps):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        bench_results.append((benchmark.group, name, stats.stats.min, stats.stats.median, steps))
        benchmark.extra_info["us/step"] = stats.stats.min / steps * 1e6


@pytest.mark.parametrize("impl", ["fastint", "diffusers"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["eta0", "eta1"])
@pytest.mark.parametrize("size", list(SHAPES))
def test_loop_const_model(benchmark, bench_results, size, stochastic, impl):
    pytest.importorskip("diffusers")
    torch.set_num_threads(2)
    shape = SHAPES[size]
    model = ConstModel(shape)
    zT = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    run = (fastint_loop if impl == "fastint" else diffusers_loop)(model, zT, stochastic)
    benchmark.group = f"loop {size} {list(shape)} const model, {'eta=1' if stochastic else 'eta=0'}"
    out = benchmark(run)
    assert out.shape == zT.shape and torch.isfinite(out).all()
    name = {"fastint": "fastint " + ("sddim (Philox)" if stochastic else "ddim"),
            "diffusers": "diffusers DDIMScheduler.step"}[impl]
    record(benchmark, bench_results, name, STEPS)


def test_loops_agree():
    """Deterministic DDIM on DDIMScheduler's own timesteps is the same map in both (float32 ᾱ in
    diffusers, float64 here): the timing compares like with like."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(STEPS)
    assert torch.allclose((sch.timesteps.double() + 1) / 1000, ddim_times(STEPS))
    shape = SHAPES["4K"]
    model = ConstModel(shape)
    zT = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = fastint_loop(model, zT, False)()
    b = diffusers_loop(model, zT, False)()
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


@pytest.mark.parametrize("impl", ["fastint", "diffusers"])
def test_loop_continuous_unet(benchmark, bench_results, impl):
    pytest.importorskip("diffusers")
    unet_cls = getattr(fastint.models, "ContinuousUNet", None)
    if unet_cls is None:
        pytest.skip("fastint.models.ContinuousUNet is not in this tree")
    torch.set_num_threads(2)
    shape = (4, 3, 32, 32)
    model = unet_cls(in_channels=3, ch=32, ch_mult=(1, 2), resolution=32).eval()
    zT = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    steps = 5
    run = (fastint_loop if impl == "fastint" else diffusers_loop)(model, zT, False, steps)
    benchmark.group = f"loop {list(shape)} ContinuousUNet(ch=32, ch_mult=(1, 2)), eta=0"
    with torch.no_grad():
        out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == zT.shape
    record(benchmark, bench_results, {"fastint": "fastint ddim", "diffusers": "diffusers DDIMScheduler.step"}[impl],
           steps)
