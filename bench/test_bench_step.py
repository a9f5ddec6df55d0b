"""Step-op throughput: the fused op against eager PyTorch and torch.compile, with a copy yardstick.

Run with ``make bench`` (``pytest bench --benchmark-only``; never part of the default test run).

Each benchmark group is one case (fastint.bench.Case): process (vp: dim 1; psld: dim 2, which is
also CLD's step), integrator family (ddim: deterministic, one eps; ms3: multistep, three eps;
em: stochastic, in-kernel Philox noise), state size in elements (z = [B, 8, H, W]), storage
dtype and layout. A group holds six rows:

- ``fused``: torch.ops.fastint.step (a new output per call);
- ``fused_out``: torch.ops.fastint.step_out into a preallocated output (what the sampling loop does);
- ``eager``: fastint.bench.eager_step, the same update in plain torch ops (fp32 arithmetic);
- ``compile``: torch.compile(eager_step, dynamic=False, fullgraph=True), compiled before timing;
- ``copy``: dst.copy_(z) into a preallocated tensor, the memory-bandwidth roof;
- ``clone``: z.clone(), which also pays an allocation (and page faults past the mmap threshold).

The summary printed at the end (bench/conftest.py) gives time, GB/s (bytes a single-pass kernel
must move: (2 + K) * numel * itemsize; 2 * numel * itemsize for the copy), the fused op's share of
the copy bandwidth, and eager / compile time over fused time.

Environment:
  FASTINT_BENCH_FULL=1       every combination over 16K..32M, all dtypes and layouts (long)
  FASTINT_BENCH_THREADS=1,2  thread counts (default: 2)
"""
import os

import pytest
import torch

import fastint  # noqa: F401  (loads the extension: torch.ops.fastint.step)
from fastint.bench import DTYPES, FAMILIES, FULL_SIZES, LAYOUTS, PROCESSES, Case, build_cases, default_cases
from fastint.bench import eager_step, fused_step, fused_step_out

FULL = os.environ.get("FASTINT_BENCH_FULL", "") not in ("", "0")
THREADS = [int(t) for t in os.environ.get("FASTINT_BENCH_THREADS", "2").split(",")]
STEP = 1

if FULL:
    CASES = build_cases(PROCESSES, FAMILIES, FULL_SIZES, DTYPES, LAYOUTS)
else:  # modest: fastint bench's default selection, plus every family at 16K
    CASES = default_cases() + build_cases(PROCESSES, FAMILIES, [16 << 10], ["float32"], ["contiguous"])
    CASES = list({c.name: c for c in CASES}.values())


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    """Run with n intra-op threads (at::parallel_for in the fused op, torch's own in eager, OpenMP in
    the compiled kernel)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def record(benchmark, bench_results, name, nbytes):
    """Keep min and median for the summary table (bench/conftest.py)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # benchmarks disabled: nothing was timed
        return
    tmin, tmed = stats.stats.min, stats.stats.median
    benchmark.extra_info["GB/s"] = nbytes / tmin / 1e9
    bench_results.append((benchmark.group, name, tmin, tmed, nbytes))


def _compiled():
    import torch._dynamo as dynamo

    dynamo.reset()  # one case per cache: never the recompile limit's silent fallback to eager
    return torch.compile(eager_step, dynamic=False, fullgraph=True)


@pytest.mark.parametrize("impl", ["fused", "fused_out", "eager", "compile", "copy", "clone"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_step(benchmark, bench_results, threads, case: Case, impl):
    z, eps, coef = case.inputs("cpu")
    dim, noisy = case.dim, case.noisy
    benchmark.group = f"{case.name}, {threads} thr"
    if impl in ("copy", "clone"):
        dst = torch.empty_like(z)
        out = benchmark(z.clone) if impl == "clone" else benchmark(dst.copy_, z)
        record(benchmark, bench_results, impl, 2 * z.numel() * z.element_size())
        return
    if impl == "fused_out":
        buf = torch.empty_like(z)

        def fn(z, eps, coef, step, dim, noisy):
            return fused_step_out(z, eps, coef, step, dim, noisy, buf)
    else:
        fn = {"fused": fused_step, "eager": eager_step}.get(impl) or _compiled()
    if not noisy:  # every implementation computes the same update
        want = eager_step(z, eps, coef, STEP, dim, False).float()
        tol = 1e-4 if case.dtype == "float32" else 2e-2
        torch.testing.assert_close(fn(z, eps, coef, STEP, dim, False).float(), want, rtol=tol, atol=tol)
    fn(z, eps, coef, STEP, dim, noisy)  # warm (compiles)
    out = benchmark(fn, z, eps, coef, STEP, dim, noisy)
    assert out.shape == z.shape and out.dtype == z.dtype
    if impl == "fused":
        assert out.is_contiguous(memory_format=LAYOUTS[case.layout])
    record(benchmark, bench_results, impl, case.nbytes())
