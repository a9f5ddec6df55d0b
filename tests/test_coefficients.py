"""The C++ coefficient op (torch.ops.fastint.coefficients) against independent references.

- every table against ``reference_table`` (Python maths, scipy adaptive quadrature) to 1e-10;
- VP ddim against textbook DDIM from ``alphas_cumprod`` alone;
- grids against their defining formulas;
- ddim's P, Q as the exact flow of the linear ODE with ε frozen (scipy DOP853);
- the denoising row against exact Gaussian conditioning (Tweedie);
- bad input.
"""
import math

import numpy as np
import pytest
import scipy.integrate as si
import torch

import fastint
from fastint.coefficients import GRIDS, METHODS, build_table, reference_grid, reference_table

F64 = torch.float64
PROCS = {
    "vp": lambda: fastint.VPSDE(),
    "ddpm": lambda: fastint.VPSDE.ddpm(),
    "psld": lambda: fastint.PSLD(),
    "cld": lambda: fastint.CLD(),
    "over_linear_beta": lambda: fastint.PSLD(gamma=0.01, nu=6.0, m_inv=1.0, beta_min=0.1, beta_max=20.0),
}


def op(sde, method, grid, n, t_eps=1e-3, denoise=False, options=()):
    times, table = torch.ops.fastint.coefficients(sde.process_tensor, sde.knots, float(sde.T), method,
                                                  fastint.grids.make(sde, grid, n, t_eps), denoise, list(options))
    return table, times


def assert_table_close(got, ref, rtol=1e-10):
    """Entrywise relative error <= rtol, with a floor of 1e-4 x the largest entry of the same
    2x2 block: entries far below their block's scale (e.g. Σ_xm ≈ 7e-6 at t = 1) carry the
    block's absolute rounding, and only matter at that absolute level."""
    assert got.shape == ref.shape
    blocks = [slice(0, 4), slice(4, 7)] + [slice(7 + 4 * j, 11 + 4 * j) for j in range((ref.shape[1] - 7) // 4)]
    for b in blocks:
        scale = ref[:, b].abs().amax(1, keepdim=True)
        err = (got[:, b] - ref[:, b]).abs()
        bound = rtol * torch.maximum(ref[:, b].abs(), 1e-4 * scale)
        assert torch.all(err <= bound), f"columns {b}: worst ratio {(err / bound.clamp_min(1e-300)).max():.3g}"


# --------------------------------------------------------------------------- vs the Python reference
@pytest.mark.parametrize("proc", list(PROCS))
@pytest.mark.parametrize("method", ["euler", "em", "ddim"])  # the others: tests/test_conjugate.py
@pytest.mark.parametrize("grid", GRIDS)
def test_table_matches_python_reference(proc, method, grid):
    sde = PROCS[proc]()
    denoise = grid != "uniform"
    table, times = build_table(sde, method, grid, 6, t_eps=1e-3, denoise=denoise)
    ref, rtimes = reference_table(sde, method, grid, 6, t_eps=1e-3, denoise=denoise)
    assert torch.allclose(times, rtimes, rtol=1e-13, atol=0)
    assert_table_close(table, ref)


@pytest.mark.parametrize(
    "proc, n, grid, t_eps",
    [("psld", 1, "quadratic", 1e-3), ("cld", 1, "uniform", 1e-5), ("over_linear_beta", 1, "quadratic", 1e-3),
     ("cld", 2, "logsnr", 1e-5), ("psld", 1000, "quadratic", 1e-3)],
)
def test_ddim_quadrature_on_hard_intervals(proc, n, grid, t_eps):
    """One step across the whole of (t_eps, T] (the 1/√u end and the e^{B} growth in one
    integral), a tiny t_eps, and a full 1000-step table."""
    sde = PROCS[proc]() if proc != "cld" else fastint.CLD(kappa=0.0)
    table, _ = op(sde, "ddim", grid, n, t_eps)
    ref, _ = reference_table(sde, "ddim", grid, n, t_eps=t_eps)
    assert_table_close(table, ref)


# --------------------------------------------------------------------------- textbook forms
def test_vp_ddim_is_textbook_ddim_on_the_discrete_schedule():
    """DDIM (η = 0) from alphas_cumprod alone: x' = √ᾱ' x̂₀ + √(1−ᾱ') ε with
    x̂₀ = (x − √(1−ᾱ) ε)/√ᾱ, on a grid that lands on the DDPM knots t_k = k/1000."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    sde = fastint.VPSDE(alphas_cumprod=torch.from_numpy(ac))
    table, times = op(sde, "ddim", "uniform", 9, t_eps=1e-3)
    k = np.rint(np.concatenate([times.numpy(), [1e-3]]) * 1000).astype(int)  # 1000, 889, ..., 1
    assert np.allclose(np.concatenate([times.numpy(), [1e-3]]) * 1000, k, rtol=0, atol=1e-9)
    a, a1 = ac[k[:-1] - 1], ac[k[1:] - 1]
    P = np.sqrt(a1 / a)
    Q = np.sqrt(1 - a1) - np.sqrt(a1) * np.sqrt(1 - a) / np.sqrt(a)
    assert np.allclose(table[:, 0].numpy(), P, rtol=1e-12, atol=0)
    assert np.allclose(table[:, 7].numpy(), Q, rtol=1e-11, atol=0)
    assert torch.all(table[:, [1, 2, 3, 4, 5, 6, 8, 9, 10]] == 0)


def test_vp_euler_em_denoise_are_textbook():
    sde = fastint.VPSDE()
    n, t_eps = 5, 1e-3
    t = np.array([t_eps + (1 - t_eps) * (1 - i / n) ** 2 for i in range(n + 1)])
    beta = 0.1 + t * 19.9
    alpha = np.exp(-0.25 * t**2 * 19.9 - 0.05 * t)
    sigma = np.sqrt(1 - alpha**2)
    h = t[:-1] - t[1:]
    eu, _ = op(sde, "euler", "quadratic", n, t_eps, denoise=True)
    em, _ = op(sde, "em", "quadratic", n, t_eps)
    assert np.allclose(eu[:-1, 0].numpy(), 1 + 0.5 * h * beta[:-1], rtol=1e-14, atol=0)
    assert np.allclose(eu[:-1, 7].numpy(), -0.5 * h * beta[:-1] / sigma[:-1], rtol=1e-12, atol=0)
    assert np.allclose(em[:, 7].numpy(), -h * beta[:-1] / sigma[:-1], rtol=1e-12, atol=0)
    assert np.allclose(em[:, 4].numpy(), np.sqrt(h * beta[:-1]), rtol=1e-14, atol=0)
    assert np.allclose(eu[-1, [0, 7]].numpy(), [1 / alpha[-1], -sigma[-1] / alpha[-1]], rtol=1e-9, atol=0)
    assert torch.all(eu[:, 4:7] == 0)


def test_phase_space_euler_em_follow_the_spec_formulas():
    """P = I − hF_t, Q = −h·½β D L_t^{−T} (euler), −hβ D L_t^{−T} and S = chol(hβD) (em),
    with F̄, D written from the SPEC and L from numpy's Cholesky."""
    sde = fastint.PSLD(gamma=0.3, nu=2.0, m_inv=0.5, beta_min=1.0, beta_max=10.0)
    Fb = np.array([[-0.3, 0.5], [-1.0, -2.0]])
    D = np.diag([0.3, 2.0 / 0.5])
    eu, times = op(sde, "euler", "uniform", 4)
    em, _ = op(sde, "em", "uniform", 4)
    t = np.append(times.numpy(), 1e-3)
    for i in range(4):
        h, beta = t[i] - t[i + 1], 1.0 + 9.0 * t[i]
        S = sde.marginal_cov(float(t[i]), jitter=True).numpy()
        LinvT = np.linalg.inv(np.linalg.cholesky(S)).T
        P = np.eye(2) - h * 0.5 * beta * Fb
        assert np.allclose(eu[i, :4].numpy(), P.ravel(), rtol=1e-14, atol=1e-15)
        assert np.allclose(eu[i, 7:11].numpy(), (-0.5 * h * beta * D @ LinvT).ravel(), rtol=1e-12, atol=0)
        assert np.allclose(em[i, 7:11].numpy(), (-h * beta * D @ LinvT).ravel(), rtol=1e-12, atol=0)
        Sn = np.linalg.cholesky(h * beta * D)
        assert np.allclose(em[i, 4:7].numpy(), [Sn[0, 0], Sn[1, 0], Sn[1, 1]], rtol=1e-14, atol=0)


@pytest.mark.parametrize("proc", ["psld", "cld", "over_linear_beta"])
def test_ddim_step_is_the_exact_flow_with_frozen_eps(proc):
    """With ε held constant over [t', t], z' = P z + Q ε solves dz/dt = F z + ½β D L_u^{−T} ε
    exactly; solve that linear ODE backwards with DOP853 for basis z and ε."""
    sde = PROCS[proc]()
    table, times = op(sde, "ddim", "quadratic", 4)
    t = np.append(times.numpy(), 1e-3)
    Fb, D = sde.Fbar.numpy(), sde.D.numpy()

    def rhs(u, y):  # y = [Z | W]: Z' = F Z (Z(t) = I), W' = F W + ½β D L_u^{−T} (W(t) = 0)
        b = float(sde.beta(u))
        Y = y.reshape(2, 4)
        dY = 0.5 * b * Fb @ Y
        dY[:, 2:] += 0.5 * b * D @ sde.inv_chol_T(u).numpy()
        return dY.ravel()

    for i in (0, 3):
        y0 = np.hstack([np.eye(2), np.zeros((2, 2))]).ravel()
        sol = si.solve_ivp(rhs, (t[i], t[i + 1]), y0, method="DOP853", rtol=1e-12, atol=1e-14)
        Z, W = sol.y[:, -1].reshape(2, 4)[:, :2], sol.y[:, -1].reshape(2, 4)[:, 2:]
        P, Q = table[i, :4].reshape(2, 2).numpy(), table[i, 7:11].reshape(2, 2).numpy()
        assert np.allclose(P, Z, rtol=1e-8, atol=1e-10 * np.abs(P).max())
        assert np.allclose(Q, W, rtol=1e-8, atol=1e-10 * np.abs(Q).max())


@pytest.mark.parametrize(
    "sde",
    [fastint.PSLD(jitter=0.0), fastint.CLD(jitter=0.0),
     fastint.PSLD(gamma=0.01, nu=6.0, m_inv=1.0, beta_min=0.1, beta_max=20.0, jitter=0.0)],
    ids=["psld", "cld", "over_linear_beta"],
)
def test_denoise_row_is_the_posterior_mean_for_gaussian_data(sde):
    """Data x₀ ~ N(μ, s²) per pixel and m₀ ~ N(0, κM): (x₀, m₀, z_t) is jointly Gaussian, so
    E[x₀ | z] and E[m₀ | z] are exact linear regressions. The row gets the exact ε of z
    (jitter = 0, so the ε convention is exactly this model's)."""
    t_eps, mu, s2 = 1e-3, 0.4, 0.3
    table, times = op(sde, "ddim", "uniform", 3, t_eps, denoise=True)
    assert float(times[-1]) == t_eps
    P, Q = table[-1, :4].reshape(2, 2).numpy(), table[-1, 7:11].reshape(2, 2).numpy()
    Psi = sde.transition(t_eps, 0.0).numpy()
    S0 = np.diag([s2, sde.kappa * sde.M])
    Sz = sde.marginal_cov(t_eps, sigma0=torch.from_numpy(S0)).numpy()  # Cov(z_t)
    C = S0 @ Psi.T  # Cov((x0, m0), z_t)
    L = sde.cholesky(t_eps).numpy()
    for z in (np.array([0.3, -1.2]), np.array([-2.0, 0.7])):
        mean_z = Psi @ np.array([mu, 0.0])
        post = np.array([mu, 0.0]) + C @ np.linalg.solve(Sz, z - mean_z)
        eps = L.T @ np.linalg.solve(Sz, z - mean_z)  # ε = −Lᵀ s
        assert np.allclose(P @ z + Q @ eps, post, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- grids
@pytest.mark.parametrize("proc", ["vp", "ddpm", "psld", "cld"])
def test_grids_follow_their_definitions(proc):
    sde = PROCS[proc]()
    n, t_eps = 8, 1e-3
    i = np.arange(n + 1)
    _, tu = op(sde, "euler", "uniform", n, t_eps, denoise=True)
    assert np.allclose(tu.numpy(), t_eps + (1 - t_eps) * (1 - i / n), rtol=1e-15, atol=0)
    _, tq = op(sde, "euler", "quadratic", n, t_eps, denoise=True)
    assert np.allclose(tq.numpy(), t_eps + (1 - t_eps) * (1 - i / n) ** 2, rtol=1e-15, atol=0)
    # leading: the last n + 1 of n + 2 uniform times, so the first is one step below T
    _, tl = op(sde, "euler", "leading", n, t_eps, denoise=True)
    assert np.allclose(tl.numpy(), t_eps + (1 - t_eps) * (1 - (i + 1) / (n + 1)), rtol=1e-15, atol=0)
    assert tl[0] < 1.0 and tl[-1] == t_eps
    for grid in ("logsnr", "edm"):
        _, t = op(sde, "euler", grid, n, t_eps, denoise=True)
        assert t[0] == 1.0 and t[-1] == t_eps and torch.all(t[1:] < t[:-1])
        L11 = sde.cholesky(t)[:, 0, 0]
        r = (L11 / sde.transition(t, 0.0)[:, 0, 0]).numpy()  # VP: σ/α
        if sde.dim == 1:
            assert np.allclose(r, np.sqrt(np.expm1(sde.int_beta(t).numpy())), rtol=1e-13)
        spaced = np.log(r) if grid == "logsnr" else r ** (1 / 7)
        steps = np.diff(spaced)
        assert np.allclose(steps, steps.mean(), rtol=1e-9, atol=0), steps
    assert torch.allclose(reference_grid(sde, "edm", n, t_eps), op(sde, "euler", "edm", n, t_eps, True)[1], rtol=1e-13)


# --------------------------------------------------------------------------- table structure, API
def test_table_layout_rows_and_widths():
    for sde in (fastint.VPSDE(), fastint.PSLD()):
        for method, info in METHODS.items():
            if (info.vp_only and sde.dim != 1) or (info.aug_only and sde.dim != 2):
                continue
            for denoise in (False, True):
                table, times = build_table(sde, method, "uniform", 7, denoise=denoise)
                assert table.dtype == F64 and times.dtype == F64
                assert table.shape == (info.prologue + 7 * info.calls_per_step + denoise, 7 + 4 * info.history)
                assert int(torch.isnan(times).sum()) == info.prologue
                assert times.shape == (table.shape[0],)
                assert torch.all(table[:, 4:7] == 0) != info.stochastic
                if sde.dim == 1:
                    assert torch.all(table[:, [1, 2, 3, 5, 6, 8, 9, 10]] == 0)


def test_build_table_is_cached_and_returns_copies():
    sde = fastint.PSLD()
    a, ta = build_table(sde, "ddim", "quadratic", 11)
    a.zero_()
    ta.zero_()
    b, tb = build_table(fastint.PSLD(), "ddim", "quadratic", 11)
    ref, rt = op(sde, "ddim", "quadratic", 11)
    assert torch.equal(b, ref) and torch.equal(tb, rt)
    c, _ = build_table(fastint.PSLD(gamma=0.02), "ddim", "quadratic", 11)
    assert not torch.equal(c, ref)


def test_fake_kernel_gives_the_table_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    sde = fastint.PSLD()
    grid = fastint.grids.make(sde, "uniform", 9)
    with FakeTensorMode() as mode:
        proc, knots = mode.from_tensor(sde.process_tensor), mode.from_tensor(sde.knots)
        t = mode.from_tensor(grid)
        times, table = torch.ops.fastint.coefficients(proc, knots, 1.0, "em", t, True, [])
    assert tuple(times.shape) == (10,) and tuple(table.shape) == (10, 11) and table.dtype == F64


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"method": "rk4"}, ValueError, "method"),
        ({"grid": "cosine"}, ValueError, "grid"),
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"n_steps": 2.5}, TypeError, "n_steps"),
        ({"t_eps": 0.0}, ValueError, "t_eps"),
        ({"t_eps": 1.0}, ValueError, "t_eps"),
        ({"t_eps": float("nan")}, ValueError, "t_eps"),
        ({"t_eps": "small"}, TypeError, "t_eps"),
        ({"denoise": 1}, TypeError, "denoise"),
        ({"lam": 0.5}, TypeError, "options"),
    ],
)
def test_build_table_rejects_bad_arguments(kwargs, exc, word):
    args = {"method": "ddim", "grid": "uniform", "n_steps": 5, **kwargs}
    with pytest.raises(exc, match=word):
        build_table(fastint.PSLD(), **args)


def test_build_table_rejects_non_processes():
    with pytest.raises(TypeError, match="sde"):
        build_table(object(), "ddim", "uniform", 5)


def _proc(**over):
    p = fastint.PSLD().process_tensor.clone()
    names = ["kind", "beta_min", "beta_max", "gamma", "nu", "m_inv", "kappa", "jitter"]
    for k, v in over.items():
        p[names.index(k)] = v
    return p


@pytest.mark.parametrize(
    "process, knots, method, times, T, options, exc, word",
    [
        (_proc().float(), None, "ddim", "uniform", 1.0, [], TypeError, "process must be a float64"),
        (_proc()[:7], None, "ddim", "uniform", 1.0, [], ValueError, "process must be a 1-D"),
        (_proc(kind=2.0), None, "ddim", "uniform", 1.0, [], ValueError, "kind"),
        (_proc(nu=float("nan")), None, "ddim", "uniform", 1.0, [], ValueError, "nu"),
        (_proc(gamma=-1.0), None, "ddim", "uniform", 1.0, [], ValueError, "Gamma"),
        (_proc(m_inv=0.0), None, "ddim", "uniform", 1.0, [], ValueError, "M"),
        (_proc(beta_max=float("inf")), None, "ddim", "uniform", 1.0, [], ValueError, "beta_max"),
        (_proc(), torch.zeros(3), "ddim", "uniform", 1.0, [], ValueError, "knots must have shape"),
        (_proc(), torch.tensor([[0.0, 0.0], [1.0, -1.0]]), "ddim", "uniform", 1.0, [], ValueError, "increasing"),
        (_proc(), torch.tensor([[0.0, 0.0], [0.5, 1.0]]), "ddim", "uniform", 1.0, [], ValueError, "end at t = T"),
        (_proc(), None, "nope", "uniform", 1.0, [], ValueError, "method must be one of"),
        (_proc(), None, "ddim", [1.0], 1.0, [], ValueError, "at least 2"),
        (_proc(), None, "ddim", [1.0, 0.5, 0.5], 1.0, [], ValueError, "strictly decreasing"),
        (_proc(), None, "ddim", [1.0, 0.2, 0.5], 1.0, [], ValueError, "strictly decreasing"),
        (_proc(), None, "ddim", [2.0, 0.5], 1.0, [], ValueError, r"lie in \(0, T\]"),
        (_proc(), None, "ddim", [1.0, 0.0], 1.0, [], ValueError, r"lie in \(0, T\]"),
        (_proc(), None, "ddim", [1.0, float("nan")], 1.0, [], ValueError, r"lie in \(0, T\]"),
        (_proc(), None, "ddim", torch.ones(2, 2, dtype=F64), 1.0, [], ValueError, "1-D"),
        (_proc(), None, "ddim", torch.tensor([1.0, 0.5], dtype=torch.float32), 1.0, [], TypeError, "float64"),
        (_proc(), None, "ddim", "uniform", float("nan"), [], ValueError, "T must"),
        (_proc(), None, "ddim", "uniform", 1.0, [0.5], ValueError, "options"),
    ],
)
def test_op_rejects_bad_input(process, knots, method, times, T, options, exc, word):
    knots = torch.zeros(0, 2, dtype=F64) if knots is None else knots.to(F64)
    if isinstance(times, str):
        times = torch.linspace(1.0, 1e-3, 6, dtype=F64)
    elif not isinstance(times, torch.Tensor):
        times = torch.tensor(times, dtype=F64)
    with pytest.raises(exc, match=word):
        torch.ops.fastint.coefficients(process, knots, T, method, times, False, options)
