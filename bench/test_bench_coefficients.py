"""Benchmarks of torch.ops.fastint.coefficients: one 1000-step table, built from scratch.

The op is called directly (build_table would serve repeats from its cache). For scale, the
Python float64 reference (scipy's adaptive quad_vec over all steps at once) builds the same
ddim table. Run with:  make bench   (pytest bench --benchmark-only)
"""
import pytest
import torch

import fastint
from fastint.coefficients import reference_table

N = 1000
CASES = [
    ("vp", "ddim", "quadratic"),
    ("vp", "em", "logsnr"),
    ("psld", "euler", "quadratic"),
    ("psld", "em", "quadratic"),
    ("psld", "ddim", "uniform"),
    ("psld", "ddim", "quadratic"),
    ("psld", "ddim", "logsnr"),
    ("cld", "ddim", "quadratic"),
]
PROCS = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}


@pytest.mark.parametrize("proc, method, grid", CASES, ids=["-".join(c) for c in CASES])
def test_coefficients_1000_steps(benchmark, proc, method, grid):
    sde = PROCS[proc]()
    args = (sde.process_tensor, sde.knots, method, grid, N, 1e-3, float(sde.T), True, [])
    times, table = benchmark(torch.ops.fastint.coefficients, *args)
    assert table.shape[0] == N + 1 and torch.isfinite(table).all()


def test_python_reference_1000_steps_psld_ddim(benchmark):
    """The scipy reference of the same psld-ddim-quadratic table, for comparison."""
    sde = fastint.PSLD()
    table, _ = benchmark.pedantic(reference_table, args=(sde, "ddim", "quadratic", N), kwargs={"denoise": True},
                                  rounds=3, iterations=1)
    assert table.shape[0] == N + 1
