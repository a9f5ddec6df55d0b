"""The float64 process maths (fastint/processes.py) against independent numerics.

Oracles: scipy's expm and adaptive quadrature, the SPEC's reference covariances, textbook VP
formulas, finite differences of Σ_t, and exact Gaussian conditioning.
"""
import math

import numpy as np
import pytest
import scipy.integrate as si
import scipy.linalg as sl
import torch

import fastint
from fastint.processes import expm2

F64 = torch.float64

# Phase-space processes covering every regime of the 2x2 expm: the critically damped presets,
# under- and over-damped, a linear beta, and an exactly singular start (kappa = 0, Gamma = 0).
PHASE = {
    "psld": lambda: fastint.PSLD(),
    "cld": lambda: fastint.CLD(),
    "cld_kappa0": lambda: fastint.CLD(kappa=0.0),
    "under": lambda: fastint.PSLD(gamma=0.5, nu=1.0, m_inv=4.0),
    "over_linear_beta": lambda: fastint.PSLD(gamma=0.01, nu=6.0, m_inv=1.0, beta_min=0.1, beta_max=20.0),
}
VP = {"vp": lambda: fastint.VPSDE(), "ddpm": lambda: fastint.VPSDE.ddpm()}
ALL = {**VP, **PHASE}


def expm_longdouble(M):
    """exp(M) by scaling, a 40-term Taylor series and squaring in long double: an oracle about
    three digits tighter than float64 (scipy's Padé expm is good to ~1e-13 normwise only)."""
    M = np.asarray(M, dtype=np.longdouble) / 2.0**12
    E, term = np.eye(2, dtype=np.longdouble), np.eye(2, dtype=np.longdouble)
    for n in range(1, 40):
        term = term @ M / n
        E = E + term
    for _ in range(12):
        E = E @ E
    return E.astype(np.float64)


def np_beta(sde, t):
    """β(t) written from the SPEC (linear schedule), independent of the code."""
    return sde.beta_min + (t / sde.T) * (sde.beta_max - sde.beta_min)


def np_Fbar(sde):
    return np.array([[-sde.gamma, sde.m_inv], [-1.0, -sde.nu]])


def np_D(sde):
    return np.diag([sde.gamma, sde.nu / sde.m_inv])


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("name", ["vp", "ddpm", "over_linear_beta"])
def test_int_beta_is_the_integral_of_beta(name):
    sde = ALL[name]()
    for t in (1e-3, 0.2345, 0.77, 1.0):
        pts = None if sde._knots is None else [k for k in sde._knots[0].tolist() if 0 < k < t]
        ref, _ = si.quad(lambda u: float(sde.beta(u)), 0.0, t, epsabs=0, epsrel=1e-13, limit=2000, points=pts)
        assert float(sde.int_beta(t)) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("name", ["vp", "ddpm", "over_linear_beta"])
def test_inv_int_beta_inverts_int_beta(name):
    sde = ALL[name]()
    t = torch.linspace(1e-4, 1.0, 97, dtype=F64)
    assert torch.allclose(sde.inv_int_beta(sde.int_beta(t)), t, rtol=1e-13, atol=0)


def test_vp_alpha_sigma_are_textbook():
    sde = fastint.VPSDE()
    t = torch.tensor([1e-4, 1e-3, 0.1, 0.5, 1.0], dtype=F64)
    alpha = torch.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    assert torch.allclose(sde.alpha(t), alpha, rtol=1e-14, atol=0)
    assert torch.allclose(sde.sigma(t), torch.sqrt(1 - alpha**2), rtol=1e-12, atol=0)
    assert torch.allclose(sde.log_snr(t), torch.log(alpha / torch.sqrt(1 - alpha**2)), rtol=1e-12, atol=0)
    assert torch.allclose(sde.marginal_cov(t)[:, 0, 0], 1 - alpha**2, rtol=1e-12, atol=0)


def test_ddpm_schedule_hits_alphas_cumprod_at_knots():
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    sde = fastint.VPSDE(alphas_cumprod=torch.from_numpy(ac))
    i = np.array([1, 2, 10, 500, 999, 1000])
    t = torch.from_numpy(i / 1000.0)
    assert np.allclose(sde.alpha(t).numpy() ** 2, ac[i - 1], rtol=1e-13, atol=0)
    # β is the constant rate of the knot interval, ≈ 1000 β_i for small β_i.
    assert float(sde.beta(0.0005)) == pytest.approx(-1000 * math.log(1 - 1e-4), rel=1e-12)
    assert torch.allclose(fastint.VPSDE.ddpm().alphas_cumprod, torch.from_numpy(ac), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- transition
@pytest.mark.parametrize("name", list(PHASE))
def test_transition_matches_scipy_expm(name):
    sde = PHASE[name]()
    Fb = np_Fbar(sde)
    for t, s in [(1e-3, 0.0), (0.3, 0.1), (1.0, 0.0), (0.2, 0.9)]:
        b = float(sde.int_beta(t) - sde.int_beta(s))
        ref = sl.expm(0.5 * b * Fb)
        got = sde.transition(t, s).numpy()
        assert np.allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())  # scipy's own accuracy
        assert np.allclose(got, expm_longdouble(0.5 * b * Fb), rtol=1e-14, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e-14, -1e-14, 1e-7, -1e-7, 0.3, -0.3])
def test_expm2_is_exact_through_the_repeated_eigenvalue(offset):
    """Critical damping (δ = 0) and its neighbourhood on both sides (δ ≷ 0)."""
    for scale in (1e-3, 1.0, 7.0):
        M = scale * np.array([[-1.0, 0.5], [-0.5 + offset, -2.0]])  # δ = scale²·offset/2
        got = expm2(torch.from_numpy(M)).numpy()
        assert np.allclose(got, sl.expm(M), rtol=0, atol=1e-12 * np.abs(got).max())
        assert np.allclose(got, expm_longdouble(M), rtol=1e-14, atol=0)


def test_transition_is_a_semigroup():
    sde = fastint.PSLD()
    t, s, r = torch.tensor(0.9, dtype=F64), torch.tensor(0.4, dtype=F64), torch.tensor(0.05, dtype=F64)
    assert torch.allclose(sde.transition(t, s) @ sde.transition(s, r), sde.transition(t, r), rtol=1e-13, atol=1e-15)


def test_marginal_mean_applies_the_transition_per_pixel():
    sde = fastint.PSLD()
    z0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    out = sde.marginal_mean(z0, t)
    for b in range(3):
        Psi = sl.expm(0.5 * float(sde.int_beta(t[b])) * np_Fbar(sde))
        x, m = z0[b, :2].numpy(), z0[b, 2:].numpy()
        assert np.allclose(out[b, :2].numpy(), Psi[0, 0] * x + Psi[0, 1] * m, rtol=1e-13, atol=1e-15)
        assert np.allclose(out[b, 2:].numpy(), Psi[1, 0] * x + Psi[1, 1] * m, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("name", list(PHASE))
def test_marginal_cov_is_the_lyapunov_integral(name):
    """Σ_t = Ψ Σ₀ Ψᵀ + ∫₀ᵗ β(u) Ψ(t,u) D Ψ(t,u)ᵀ du, the integral by scipy's adaptive
    quadrature with scipy's expm (nothing shared with the closed form under test)."""
    sde = PHASE[name]()
    Fb, D = np_Fbar(sde), np_D(sde)
    B = lambda u: sde.beta_min * u + 0.5 * u * u * (sde.beta_max - sde.beta_min) / sde.T  # noqa: E731
    S0 = np.diag([0.3, sde.kappa * sde.M])
    for t in (1e-4, 1e-3, 0.1, 0.6, 1.0):
        def integrand(u):
            Psi = sl.expm(0.5 * (B(t) - B(u)) * Fb)
            return (np_beta(sde, u) * Psi @ D @ Psi.T).ravel()

        integral, _ = si.quad_vec(integrand, 0.0, t, epsabs=0, epsrel=1e-13, norm="max")
        E = sl.expm(0.5 * B(t) * Fb)
        ref = E @ S0 @ E.T + integral.reshape(2, 2)
        got = sde.marginal_cov(t, sigma0=torch.from_numpy(S0)).numpy()
        assert np.allclose(got, ref, rtol=1e-11, atol=1e-14 * np.abs(ref).max()), (t, got, ref)
        # The convention Σ₀ = diag(0, κM) is the default.
        E0 = sl.expm(0.5 * B(t) * Fb) @ np.diag([0.0, sde.kappa * sde.M]) @ E.T
        got0 = sde.marginal_cov(t).numpy()
        assert np.allclose(got0, E0 + integral.reshape(2, 2), rtol=1e-11, atol=1e-14 * np.abs(ref).max())


def test_psld_covariance_matches_spec_reference_values():
    sde = fastint.PSLD()
    table = {1e-3: (8.31904e-5, 2.19167e-4, 1.75762e-2), 0.1: (0.228011, 0.128825, 0.216031),
             1.0: (0.999985, 6.53217e-6, 0.249997)}
    for t, (xx, xm, mm) in table.items():
        S = sde.marginal_cov(t)
        for got, want in ((S[0, 0], xx), (S[0, 1], xm), (S[1, 0], xm), (S[1, 1], mm)):
            assert float(got) == pytest.approx(want, rel=6e-6)  # the SPEC prints 6 digits


def test_prior_is_the_stationary_law():
    """½F̄Σ + ½ΣF̄ᵀ + D = 0 for Σ = prior_cov (so Σ_t -> prior as t grows)."""
    for sde in (fastint.PSLD(), fastint.CLD(), fastint.PSLD(gamma=0.3, nu=2.0, m_inv=0.5), fastint.VPSDE()):
        S, Fb, D = sde.prior_cov(), sde.Fbar, sde.D
        assert torch.allclose(0.5 * (Fb @ S + S @ Fb.T) + D, torch.zeros_like(S), atol=1e-15)
    long = fastint.PSLD(T=10.0)
    assert torch.allclose(long.marginal_cov(10.0), long.prior_cov(), atol=1e-12)


@pytest.mark.parametrize("name", list(ALL))
def test_cholesky_factors_the_jittered_covariance(name):
    sde = ALL[name]()
    t = torch.tensor([1e-4, 1e-3, 0.3, 1.0], dtype=F64)
    L, Li = sde.cholesky(t), sde.inv_chol_T(t)
    S = sde.marginal_cov(t, jitter=True)
    assert torch.allclose(L @ L.mT, S, rtol=1e-13, atol=1e-15 * S.abs().max())
    assert torch.all(L.triu(1) == 0)
    eye = torch.eye(sde.dim, dtype=F64).expand_as(L)
    assert torch.allclose(Li @ L.mT, eye, rtol=0, atol=1e-12)
    if sde.dim == 2:
        assert torch.allclose(S - sde.marginal_cov(t), 1e-9 * torch.eye(2, dtype=F64).expand_as(S), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- sampling
def test_prior_sample_shape_reproducibility_and_law():
    sde = fastint.PSLD()
    z = sde.prior_sample((4000, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 6, 8, 8) and z.dtype == torch.float32
    z2 = sde.prior_sample((4000, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)
    x, m = z[:, :3].double(), z[:, 3:].double()
    n = x.numel()
    # sample variance has sd ≈ var·√(2/n); 5 sd bounds
    assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(m.var().item() - sde.M) < 5 * sde.M * math.sqrt(2 / n)
    assert abs(x.mean().item()) < 5 / math.sqrt(n) and abs(m.mean().item()) < 5 * math.sqrt(sde.M / n)
    assert abs((x * m).mean().item()) < 5 * math.sqrt(sde.M / n)
    vp = fastint.VPSDE().prior_sample((2, 3, 4), dtype=F64)
    assert vp.shape == (2, 3, 4) and vp.dtype == F64


def test_data_part_is_a_view_of_x():
    z = torch.randn(2, 6, 3)
    assert fastint.PSLD().data_part(z).data_ptr() == z.data_ptr()
    assert torch.equal(fastint.PSLD().data_part(z), z[:, :3])
    assert fastint.VPSDE().data_part(z) is z


# --------------------------------------------------------------------------- ε, score, drifts
def test_vp_prediction_conversions():
    sde = fastint.VPSDE()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.4, 0.8, 1.0], dtype=F64)
    a = torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t)[:, None, None]
    s = torch.sqrt(1 - a**2)
    z = a * x0 + s * eps
    v = a * eps - s * x0
    assert torch.allclose(sde.x0_to_eps(x0, z, t), eps, atol=1e-9)
    assert torch.allclose(sde.eps_to_x0(eps, z, t), x0, atol=1e-12)
    assert torch.allclose(sde.v_to_eps(v, z, t), eps, atol=1e-12)
    assert torch.allclose(sde.eps_to_score(eps, t), -eps / s, rtol=1e-12)
    assert torch.allclose(sde.score_to_eps(-eps / s, t), eps, rtol=1e-12)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v), ("score", -eps / s)):
        assert torch.allclose(sde.to_eps(out, z, t, pred), eps, atol=1e-9)


@pytest.mark.parametrize("name", list(PHASE))
def test_phase_space_score_is_minus_precision_times_L_eps(name):
    """s = −L^{−T} ε equals −Σ⁻¹ (L ε), the score of N(μ, Σ) at μ + L ε."""
    sde = PHASE[name]()
    eps = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=F64)
    S = sde.marginal_cov(t, jitter=True)
    Leps = sde.apply(sde.cholesky(t), eps)
    want = -sde.apply(torch.linalg.inv(S), Leps)
    got = sde.eps_to_score(eps, t)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max())
    assert torch.allclose(sde.score_to_eps(got, t), eps, rtol=1e-10, atol=1e-10)
    assert torch.allclose(sde.to_eps(got, eps, t, "score"), eps, rtol=1e-10, atol=1e-10)


def _dcov_dt(sde, t, sigma0, h=2e-4):
    """dΣ/dt by the 5-point stencil (error O(h⁴))."""
    c = lambda u: sde.marginal_cov(u, sigma0=sigma0)  # noqa: E731
    return (-c(t + 2 * h) + 8 * c(t + h) - 8 * c(t - h) + c(t - 2 * h)) / (12 * h)


def _velocity_matrix(sde, drift, t, S_data):
    """The linear map z -> drift(z, t, ε(z)) for Gaussian data N(0, S_data) with its exact ε."""
    d = sde.dim
    cols = []
    for j in range(d):
        z = torch.zeros(1, d, 1, dtype=F64)
        z[0, j] = 1.0
        score = -sde.apply(torch.linalg.inv(S_data), z)
        eps = sde.score_to_eps(score, t)
        cols.append(drift(z, t, eps)[0, :, 0])
    return torch.stack(cols, 1)


@pytest.mark.parametrize("name", ["vp", "psld", "cld", "over_linear_beta"])
def test_drifts_transport_gaussian_marginals(name):
    """For Gaussian data the PF-ODE velocity V obeys VΣ + ΣVᵀ = dΣ/dt, and the reverse SDE
    (run backwards with diffusion GGᵀ) obeys VΣ + ΣVᵀ − GGᵀ = dΣ/dt: both reproduce the
    forward marginals. dΣ/dt comes from finite differences of marginal_cov."""
    sde = ALL[name]()
    sigma0 = torch.diag(torch.tensor([0.7, sde.kappa * sde.M] if sde.dim == 2 else [0.7], dtype=F64))
    for t in (0.05, 0.3, 0.9):
        S = sde.marginal_cov(t, sigma0=sigma0)
        dS = _dcov_dt(sde, t, sigma0)
        V = _velocity_matrix(sde, sde.pf_ode_drift, t, S)
        # 5e-9: the finite difference's own error near stationarity, where dΣ/dt is small
        assert torch.allclose(V @ S + S @ V.T, dS, rtol=1e-8, atol=5e-9 * dS.abs().max())
        Vr = _velocity_matrix(sde, sde.reverse_sde_drift, t, S)
        GG = sde.diffusion_matrix(t)
        assert torch.allclose(Vr @ S + S @ Vr.T - GG, dS, rtol=1e-8, atol=5e-9 * dS.abs().max())


def test_apply_uses_per_sample_matrices_on_channel_halves():
    sde = fastint.CLD()
    z = torch.randn(2, 4, 3, dtype=torch.float32)
    M = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [0.0, -1.0]]], dtype=F64)
    out = sde.apply(M, z)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :2], z[0, :2] + 2 * z[0, 2:])
    assert torch.allclose(out[0, 2:], 3 * z[0, :2] + 4 * z[0, 2:])
    assert torch.allclose(out[1], torch.cat([0.5 * z[1, :2], -z[1, 2:]]))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "ctor, kwargs, word",
    [
        (fastint.PSLD, {"gamma": -0.1}, "gamma"),
        (fastint.PSLD, {"nu": 0.0}, "nu"),
        (fastint.PSLD, {"m_inv": -4.0}, "m_inv"),
        (fastint.PSLD, {"kappa": float("nan")}, "kappa"),
        (fastint.PSLD, {"beta_min": float("inf")}, "beta_min"),
        (fastint.PSLD, {"beta_max": -1.0}, "beta_max"),
        (fastint.PSLD, {"beta_min": 0.0, "beta_max": 0.0}, "beta_min"),
        (fastint.PSLD, {"T": 0.0}, "T"),
        (fastint.PSLD, {"jitter": -1e-9}, "jitter"),
        (fastint.CLD, {"kappa": 0.0, "jitter": 0.0}, "jitter"),
        (fastint.CLD, {"nu": float("nan")}, "nu"),
        (fastint.VPSDE, {"beta_max": float("nan")}, "beta_max"),
        (fastint.VPSDE, {"beta_min": -0.1}, "beta_min"),
        (fastint.VPSDE, {"T": -1.0}, "T"),
        (fastint.VPSDE, {"alphas_cumprod": [0.9, 0.95]}, "decreasing"),
        (fastint.VPSDE, {"alphas_cumprod": [1.0, 0.5]}, "alphas_cumprod"),
        (fastint.VPSDE, {"alphas_cumprod": [0.5, float("nan")]}, "alphas_cumprod"),
        (fastint.VPSDE, {"alphas_cumprod": [[0.5]]}, "alphas_cumprod"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(ctor, kwargs, word):
    with pytest.raises(ValueError, match=word):
        ctor(**kwargs)


def test_bad_parameter_types_raise_type_error():
    with pytest.raises(TypeError, match="nu"):
        fastint.PSLD(nu="4")
    with pytest.raises(TypeError, match="T"):
        fastint.VPSDE(T=None)
    with pytest.raises(ValueError, match="n"):
        fastint.VPSDE.ddpm(n=0)


@pytest.mark.parametrize("t", [0.0, -0.1, 1.5, float("nan"), torch.tensor([0.5, 1.01])])
def test_times_outside_0_T_are_rejected(t):
    sde = fastint.PSLD()
    with pytest.raises(ValueError, match="t must"):
        sde.cholesky(t)
    with pytest.raises(ValueError, match="t must"):
        sde.eps_to_score(torch.zeros(2, 2, 1), t)


def test_state_shape_errors():
    sde = fastint.PSLD()
    with pytest.raises(ValueError, match="even channel count"):
        sde.pf_ode_drift(torch.zeros(2, 3, 4), 0.5, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="one per batch element"):
        sde.eps_to_score(torch.zeros(2, 2, 4), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="ndim >= 2"):
        sde.data_part(torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        sde.data_part(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="state's shape"):
        sde.to_eps(torch.zeros(2, 2, 3), torch.zeros(2, 2, 4), 0.5)
    with pytest.raises(ValueError, match="prediction"):
        sde.to_eps(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), 0.5, "x0")
    with pytest.raises(ValueError, match="prediction"):
        fastint.VPSDE().to_eps(torch.zeros(2, 2), torch.zeros(2, 2), 0.5, "noise")
    with pytest.raises(ValueError, match="shape"):
        sde.prior_sample((4,))
    with pytest.raises(ValueError, match="sigma0"):
        sde.marginal_cov(0.5, sigma0=torch.eye(3))
