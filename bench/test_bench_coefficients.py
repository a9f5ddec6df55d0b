"""Benchmarks of torch.ops.fastint.coefficients: one 1000-step table, built from scratch.

The op is called directly (build_table would serve repeats from its cache). For scale, the same
psld-ddim coefficients built two ways in Python float64: scipy's adaptive quad_vec over all steps
at once (fastint.coefficients.reference_table, the test oracle), and one adaptive RK45 solve per
step (scipy solve_ivp, the approach of the authors' code). Run with:  make bench
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
    args = (sde.process_tensor, sde.knots, float(sde.T), method, fastint.grids.make(sde, grid, N), True, [])
    times, table = benchmark(torch.ops.fastint.coefficients, *args)
    assert table.shape[0] == N + 1 and torch.isfinite(table).all()


def test_python_reference_1000_steps_psld_ddim(benchmark):
    """The scipy reference of the same psld-ddim-quadratic table, for comparison."""
    sde = fastint.PSLD()
    table, _ = benchmark.pedantic(reference_table, args=(sde, "ddim", "quadratic", N), kwargs={"denoise": True},
                                  rounds=3, iterations=1)
    assert table.shape[0] == N + 1


def odeint_ddim_table(sde, tg, rtol=1e-6, atol=1e-9):
    """The ddim Q coefficients the way the authors' code gets them: one adaptive RK45 solve
    (scipy solve_ivp) of dQ/du = -Psi(t', u) 1/2 beta(u) D L_u^{-T} per step, u from t' to t."""
    from scipy.integrate import solve_ivp

    D = sde.D
    Qs = []
    for n in range(tg.numel() - 1):
        t, t1 = tg[n:n + 1], tg[n + 1:n + 2]

        def f(u, y):
            uu = torch.tensor([u], dtype=torch.float64)
            return (-0.5 * sde.beta(uu)[:, None, None] * (sde.transition(t1, uu) @ D @ sde.inv_chol_T(uu))).flatten().numpy()

        sol = solve_ivp(f, (float(t1), float(t)), [0.0] * 4, method="RK45", rtol=rtol, atol=atol)
        Qs.append(torch.from_numpy(sol.y[:, -1]).reshape(2, 2))
    return torch.stack(Qs)


N_ODE = 50  # steps: about 0.15 s each, so the whole 1000-step table (minutes) is not run


def test_odeint_per_step_50_of_1000_steps_psld_ddim(benchmark):
    """The first 50 steps of the 1000-step psld-ddim-quadratic Q coefficients by one RK45 solve per
    step (the authors' approach); multiply by 20 for the whole table."""
    from fastint.coefficients import reference_grid

    sde = fastint.PSLD()
    tg = reference_grid(sde, "quadratic", N, t_eps=1e-3)[:N_ODE + 1]
    Q = benchmark.pedantic(odeint_ddim_table, args=(sde, tg), rounds=1, iterations=1)
    _, table = torch.ops.fastint.coefficients(sde.process_tensor, sde.knots, float(sde.T), "ddim",
                                              fastint.grids.make(sde, "quadratic", N), False, [])
    want = table[:N_ODE, 7:11].reshape(N_ODE, 2, 2).to(Q.dtype)
    assert torch.allclose(Q, want, rtol=1e-3, atol=1e-6 * want.abs().max())
