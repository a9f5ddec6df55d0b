"""CPU benchmark of the fused step op against the same update in eager PyTorch.

Run with ``pytest bench --benchmark-only`` (never part of the default test run). The state
is a PSLD batch of RGB images, z = [40, 6, 64, 64] float32 (x and m halves of C = 3
channels, 983,040 elements), with a one-term history (dim 2, K = 1). Each benchmark group
holds the fused op and its eager twin at one thread count (1 or 2), so pytest-benchmark's
relative column shows the ratio; ``copy`` (z.clone()) is the memory-bandwidth yardstick.
The summary printed at the end (bench/conftest.py) gives fused/eager and GB/s from the min
times, counting the bytes a single-pass kernel must move (read z and eps, write z': 12 bytes
per element for float32; a copy moves 8).
"""
import pytest
import torch

import fastint  # noqa: F401  (loads the extension: torch.ops.fastint.step)

SHAPE = (40, 6, 64, 64)
STEP = 1
SEED = 1234


def make_inputs(memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(SHAPE, generator=gen).to(memory_format=memory_format)
    eps = torch.randn(SHAPE, generator=gen).to(memory_format=memory_format)
    coef = torch.randn(4, 11, generator=gen)  # rows [P(4), S(3), Q0(4)]
    return z, eps, coef


def fused(z, eps, coef, seed):
    return torch.ops.fastint.step(z, [eps], coef, STEP, 2, None, seed, 0)


def eager(z, eps, coef, seed):
    """The same update with ordinary torch ops (coefficients as Python floats, noise from
    torch.randn), written as a sampler loop would: halves as views, torch.cat into the state."""
    p00, p01, p10, p11, s00, s10, s11, q00, q01, q10, q11 = coef[STEP].tolist()
    c = z.shape[1] // 2
    x, m = z[:, :c], z[:, c:]
    ex, em = eps[:, :c], eps[:, c:]
    xn = p00 * x + p01 * m + q00 * ex + q01 * em
    mn = p10 * x + p11 * m + q10 * ex + q11 * em
    if seed is not None:
        xi_x, xi_m = torch.randn_like(x), torch.randn_like(m)
        xn = xn + s00 * xi_x
        mn = mn + s10 * xi_x + s11 * xi_m
    return torch.cat([xn, mn], dim=1)


CASES = {  # name: (memory format, seed)
    "deterministic": (torch.contiguous_format, None),
    "philox-noise": (torch.contiguous_format, SEED),
    "channels_last-deterministic": (torch.channels_last, None),
    "channels_last-philox-noise": (torch.channels_last, SEED),
}
THREADS = [1, 2]


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    """Run with n intra-op threads (at::parallel_for in the fused op, torch's own in eager).

    The 1-thread groups are the stable comparison when another process holds a core: a
    2-thread op then waits a scheduler tick for its second thread, eager once per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def group_name(case, threads):
    return f"step {case}, {threads} thread{'s' if threads > 1 else ''}"


def record(benchmark, bench_results, group, name, nbytes):
    """Keep min and median for the summary table (bench/conftest.py)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # benchmarks disabled: nothing was timed
        return
    tmin, tmed = stats.stats.min, stats.stats.median
    benchmark.extra_info["GB/s"] = nbytes / tmin / 1e9
    bench_results.append((group, name, tmin, tmed, nbytes))


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, bench_results, threads, case, impl):
    fmt, seed = CASES[case]
    z, eps, coef = make_inputs(fmt)
    fn = fused if impl == "fused" else eager
    benchmark.group = group_name(case, threads)
    out = benchmark(fn, z, eps, coef, seed)
    assert out.shape == z.shape
    if impl == "fused":
        assert out.is_contiguous(memory_format=fmt)
    if seed is None:  # the two agree (up to fp32 summation order) when there is no noise
        torch.testing.assert_close(out, eager(z, eps, coef, None), rtol=1e-5, atol=1e-5)
    record(benchmark, bench_results, benchmark.group, impl, 3 * z.numel() * z.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_copy(benchmark, bench_results, threads, case):
    """z.clone() in the same layout: the memory-bandwidth yardstick of each group."""
    fmt, _ = CASES[case]
    z, _, _ = make_inputs(fmt)
    benchmark.group = group_name(case, threads)
    out = benchmark(z.clone)
    assert out.is_contiguous(memory_format=fmt)
    record(benchmark, bench_results, benchmark.group, "copy", 2 * z.numel() * z.element_size())
