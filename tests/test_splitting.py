"""Splitting integrators (issue 4): naive / reduced / conjugate, deterministic and stochastic.

- every table row equals its sub-steps applied one after another, recomputed here in float64
  from the process maths and scipy quadrature (docs/integrators.md §6 gives the sub-steps);
- deterministic methods converge on the 2-D PSLD/CLD mixtures (slope against DOP853);
- stochastic methods converge weakly: on Gaussian data the sampler is an affine Gaussian map,
  so its output mean and covariance are computed exactly from the table (no Monte Carlo) and
  their error must fall with NFE at a measured slope;
- reduced and conjugate methods make one model call per step; nfe is always the call count;
- stochastic methods are reproducible with a generator and match a Gaussian target's moments
  within Monte-Carlo error.
"""
import math

import numpy as np
import pytest
import scipy.integrate as si
import torch

import fastint
from fastint import CLD, METHODS, PSLD, VPSDE, Sampler
from fastint.coefficients import build_table, cspsd_method, reference_grid
from fastint.models import GaussianMixture, reference_solution, tweedie_reference

F64 = torch.float64
SPLIT_DET = ["nse", "nvv", "rse", "rvv", "cse", "cvv", "cspsd"]
SPLIT_STO = ["noba", "nbao", "nobab", "roba", "sps", "cspss", "sscs"]
PROCS = {"psld": PSLD, "cld": CLD}


# ------------------------------------------------------------------ independent sub-steps
class SubSteps:
    """The sub-flows of docs/integrators.md §6 as float64 maps on explicit vectors.

    State (x, m), frozen model output eps = (ex, em) made at z_n = (xn, mn); c = 1/2 for
    the PF-ODE, 1 for the reverse SDE. The score is s = -Lambda z + r with Lambda =
    diag(1, 1/M) and the residual r = s(z_n) + Lambda z_n frozen.
    """

    def __init__(self, sde):
        self.sde = sde
        self.g, self.nu, self.minv = sde.gamma, sde.nu, 1.0 / sde.M
        self.M = sde.M

    def B(self, t):
        return float(self.sde.int_beta(torch.tensor(t, dtype=F64)))

    def DLi(self, t):  # D L_t^{-T}
        return (self.sde.D @ self.sde.inv_chol_T(torch.tensor([t], dtype=F64))[0]).numpy()

    def resid(self, zn, eps, t):  # r = s(z_n) + Lambda z_n, s = -L^{-T} eps
        Li = self.sde.inv_chol_T(torch.tensor([t], dtype=F64))[0].numpy()
        return -Li @ eps + np.array([zn[0], zn[1] / self.M])

    def x_euler(self, z, zn, eps, lo, hi, te, c, fric):
        db = self.B(hi) - self.B(lo)
        x, m = z
        r = self.resid(zn, eps, te)
        dx = fric * (0.5 * self.g * x - c * self.g * x) - 0.5 * self.minv * m + c * self.g * r[0]
        # fric = 0: the diagonal linear term belongs to the O step, the residual kick stays
        return np.array([x + db * dx, m])

    def m_euler(self, z, zn, eps, lo, hi, te, c, fric):
        db = self.B(hi) - self.B(lo)
        x, m = z
        r = self.resid(zn, eps, te)
        dm = 0.5 * x + fric * (0.5 * self.nu * m - c * self.nu * m) + c * self.M * self.nu * r[1]
        return np.array([x, m + db * dm])

    def _conj(self, z, zn, eps, lo, hi, c, row):
        """Exact solution of the linear sub-flow with the residual frozen: by scipy quad."""
        x, m = z
        rate = (0.5 - c) * (self.g if row == 0 else self.nu)
        blo, bhi = self.B(lo), self.B(hi)
        db = bhi - blo
        w = db if rate == 0 else math.expm1(rate * db) / rate
        Lam_zn = np.array([zn[0], zn[1] / self.M])
        scale = self.g if row == 0 else self.M * self.nu
        # the eps part: -c int beta(u) e^{rate (B(u) - blo)} (D L_u^{-T} eps)_row du
        def f(u):
            bu = self.B(u)
            return -c * float(self.sde.beta(torch.tensor(u, dtype=F64))) * math.exp(rate * (bu - blo)) * (self.DLi(u) @ eps)[row]
        pts = np.geomspace(lo, hi, 12)
        q = sum(si.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=200)[0] for a, b in zip(pts[:-1], pts[1:]))
        if row == 0:
            return np.array([math.exp(rate * db) * x - 0.5 * self.minv * w * m + c * scale * w * Lam_zn[0] + q, m])
        return np.array([x, math.exp(rate * db) * m + 0.5 * w * x + c * scale * w * Lam_zn[1] + q])

    def x_conj(self, z, zn, eps, lo, hi, c):
        return self._conj(z, zn, eps, lo, hi, c, 0) if self.g > 0 else \
            np.array([z[0] - 0.5 * self.minv * (self.B(hi) - self.B(lo)) * z[1], z[1]])

    def m_conj(self, z, zn, eps, lo, hi, c):
        return self._conj(z, zn, eps, lo, hi, c, 1)

    def o_mean(self, z, lo, hi):
        db = self.B(hi) - self.B(lo)
        return np.array([math.exp(-0.5 * self.g * db) * z[0], math.exp(-0.5 * self.nu * db) * z[1]])

    def mid(self, lo, hi):
        return float(self.sde.inv_int_beta(torch.tensor(0.5 * (self.B(lo) + self.B(hi)), dtype=F64)))


def apply_row(sub, method, z, eps, t, t1, first="x"):
    """One reduced/conjugate step (the noise-free mean for stochastic ones) from the model call at t."""
    zn = z.copy()
    tm = sub.mid(t1, t)
    if method == "rse" or method == "cse":
        conj = method == "cse"
        for flow in (("x", "m") if first == "x" else ("m", "x")):
            if flow == "x":
                z = sub.x_conj(z, zn, eps, t1, t, 0.5) if conj else sub.x_euler(z, zn, eps, t1, t, t, 0.5, 1)
            else:
                z = sub.m_conj(z, zn, eps, t1, t, 0.5) if conj else sub.m_euler(z, zn, eps, t1, t, t, 0.5, 1)
    elif method == "rvv":
        z = sub.m_euler(z, zn, eps, tm, t, t, 0.5, 1)
        z = sub.x_euler(z, zn, eps, t1, t, t, 0.5, 1)
        z = sub.m_euler(z, zn, eps, t1, tm, t, 0.5, 1)
    elif method == "cvv":
        z = sub.m_conj(z, zn, eps, tm, t, 0.5)
        z = sub.x_conj(z, zn, eps, t1, t, 0.5)
        z = sub.m_conj(z, zn, eps, t1, tm, 0.5)
    elif method in ("roba", "sps"):
        z = sub.o_mean(z, t1, t)
        z = sub.m_euler(z, zn, eps, t1, t, t, 1.0, 0)
        z = sub.x_euler(z, zn, eps, t1, t, t, 1.0, 0)
    elif method == "cspss":
        z = sub.m_conj(z, zn, eps, tm, t, 1.0)
        z = sub.x_conj(z, zn, eps, t1, t, 1.0)
        z = sub.m_conj(z, zn, eps, t1, tm, 1.0)
    else:
        raise NotImplementedError(method)
    return z


@pytest.mark.parametrize("proc", ["psld", "cld"])
@pytest.mark.parametrize("method,first", [("rse", "x"), ("rse", "m"), ("cse", "x"), ("cse", "m"), ("rvv", None),
                                          ("cvv", None), ("roba", None), ("sps", None), ("cspss", None)])
def test_row_is_its_substeps_in_float64(proc, method, first):
    sde = PROCS[proc]()
    opts = {"first": first} if first else {}
    n_steps = 3
    table, times = build_table(sde, method, "quadratic", n_steps, **opts)
    tg = reference_grid(sde, "quadratic", n_steps).tolist()
    sub = SubSteps(sde)
    rng = np.random.default_rng(0)
    for n in range(n_steps):
        row = table[n].numpy()
        P, Q = row[0:4].reshape(2, 2), row[7:11].reshape(2, 2)
        for _ in range(1):
            z, eps = rng.standard_normal(2), rng.standard_normal(2)
            want = apply_row(sub, method, z, eps, tg[n], tg[n + 1], first or "x")
            got = P @ z + Q @ eps
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_o_step_noise_covariance_is_exact_ou():
    """roba's S S^T equals the O step's covariance pushed through the kicks (P of B, A)."""
    sde = PSLD()
    table, _ = build_table(sde, "roba", "uniform", 3)
    tg = reference_grid(sde, "uniform", 3).tolist()
    sub = SubSteps(sde)
    for n in range(3):
        db = sub.B(tg[n]) - sub.B(tg[n + 1])
        C = np.diag([-math.expm1(-sde.gamma * db), sde.M * -math.expm1(-sde.nu * db)])
        # the kicks' linear part on the current state (the residual's z_n terms do not act on noise)
        Pb = np.array([[1, 0], [0.5 * db, 1]])
        Pa = np.array([[1, -0.5 * db / sde.M], [0, 1]])
        K = Pa @ Pb
        want = K @ C @ K.T
        S = np.array([[table[n, 4], 0], [table[n, 5], table[n, 6]]])
        np.testing.assert_allclose(S @ S.T, want, rtol=1e-10, atol=1e-14)


def test_first_row_of_noba_makes_no_model_call():
    sde = PSLD()
    _, times = build_table(sde, "noba", "quadratic", 3, denoise=True)
    assert math.isnan(times[0]) and torch.isfinite(times[1:]).all()
    assert times.numel() == 1 + 3 * 2 + 1


# ------------------------------------------------------------------ model calls and nfe
class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, z, t):
        self.calls += 1
        assert torch.isfinite(t).all()
        return self.inner(z, t)


@pytest.mark.parametrize("method", SPLIT_DET + SPLIT_STO)
def test_nfe_is_the_number_of_model_calls(method):
    sde = PSLD()
    cps = METHODS[method].calls_per_step
    nfe = 1 + 4 * cps
    model = Counting(GaussianMixture.default(sde))
    zT = sde.prior_sample((8, 2, 1, 1), generator=torch.Generator().manual_seed(0))
    s = Sampler(sde, method, nfe=nfe)
    x = s.sample(model, zT, generator=torch.Generator().manual_seed(1))
    assert model.calls == nfe and torch.isfinite(x).all()
    if not method.startswith("n"):  # reduced / conjugate: one call per step
        assert cps == 1 and s.table.shape[0] - METHODS[method].prologue == nfe


def test_splitting_rejects_vp_and_bad_options():
    with pytest.raises(ValueError, match="PSLD or CLD"):
        Sampler(VPSDE(), "rse", nfe=10)
    with pytest.raises(ValueError, match="first"):
        Sampler(PSLD(), "rse", nfe=10, first="y")
    with pytest.raises(TypeError, match="first"):
        Sampler(PSLD(), "rse", nfe=10, first=1)
    with pytest.raises(ValueError, match="lam_s"):
        Sampler(PSLD(), "sps", nfe=10, lam_s=1.5)
    with pytest.raises(TypeError, match="no options"):
        Sampler(PSLD(), "cspsd", nfe=10, first="x")
    with pytest.raises(ValueError, match="does not fit"):
        Sampler(PSLD(), "nvv", nfe=11)  # 3 calls per step + 1 denoising call: 10 is not a multiple of 3


def test_cspsd_is_the_measured_choice():
    sde = PSLD()
    for nfe in (10, 20, 50, 100):
        m, o = cspsd_method(nfe)
        a, _ = build_table(sde, "cspsd", "quadratic", nfe - 1, denoise=True)
        b, _ = build_table(sde, m, "quadratic", nfe - 1, denoise=True, **o)
        assert torch.equal(a, b)


# ------------------------------------------------------------------ convergence (deterministic)
@pytest.fixture(scope="module")
def mixture_refs():
    out = {}
    for name, cls in PROCS.items():
        sde = cls()
        model = GaussianMixture.default(sde)
        zT = sde.prior_sample((48, 2, 1, 1), generator=torch.Generator().manual_seed(0), dtype=F64)
        z_ref = reference_solution(model, sde, zT)
        out[name] = (sde, model, zT, sde.data_part(tweedie_reference(model, sde, z_ref, 1e-3)))
    return out


def slope(nfes, errs):
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]


@pytest.mark.parametrize("proc", ["psld", "cld"])
@pytest.mark.parametrize("method", SPLIT_DET)
def test_deterministic_splitting_converges(mixture_refs, proc, method):
    sde, model, zT, x_ref = mixture_refs[proc]
    cps = METHODS[method].calls_per_step
    nfes = [1 + cps * n for n in ((40, 80, 160) if cps == 1 else (30, 60, 120))]
    errs = []
    for nfe in nfes:
        x = Sampler(sde, method, nfe=nfe).sample(model, zT.float())
        errs.append(float((x.double() - x_ref).flatten(1).norm(dim=1).mean()))
    s = slope(nfes, errs)
    # first order (pre-asymptotic on this mixture: measured 0.6-1.6); every doubling gains >= 1.4x
    assert 0.55 <= s <= 2.6 and all(a > 1.4 * b for a, b in zip(errs, errs[1:])), (errs, s)
    assert errs[-1] < 0.1, errs


def test_cspsd_at_20_beats_euler_at_100(mixture_refs):
    """Issue 4's claim on the analytic PSLD mixture (quadratic grid)."""
    sde, model, zT, x_ref = mixture_refs["psld"]
    err = lambda m, n: float((Sampler(sde, m, nfe=n).sample(model, zT.float()).double() - x_ref)  # noqa: E731
                             .flatten(1).norm(dim=1).mean())
    assert err("cspsd", 20) < err("euler", 100)


# ------------------------------------------------------------------ stochastic: exact weak error
def gaussian_target(sde, mean=0.5, std=0.7):
    return GaussianMixture(sde, torch.tensor([[mean]], dtype=F64), torch.tensor([std], dtype=F64))


def exact_output_moments(sde, model, method, nfe, **opts):
    """Mean and covariance of the data part of the sampler's output, propagated exactly
    through the float64 table: with Gaussian data eps(z, t) = G z + g is affine."""
    s = Sampler(sde, method, nfe=nfe, **opts)
    table, times = s.table, s.times
    mu = torch.zeros(2, dtype=F64)
    C = torch.diag(torch.tensor([1.0, sde.M], dtype=F64))  # prior N(0, diag(1, M))
    for r in range(table.shape[0]):
        row = table[r]
        P, Q = row[0:4].reshape(2, 2), row[7:11].reshape(2, 2)
        S = torch.tensor([[row[4], 0.0], [row[5], row[6]]], dtype=F64)
        if torch.isfinite(times[r]):
            t = times[r].reshape(1)
            basis = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
            e = torch.stack([model(b.reshape(1, 2), t.double())[0].double() for b in basis])
            g = e[0]
            G = torch.stack([e[1] - g, e[2] - g], 1)
        else:
            G, g = torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64)
        K = P + Q @ G
        mu = K @ mu + Q @ g
        C = K @ C @ K.T + S @ S.T
    return float(mu[0]), float(C[0, 0])


@pytest.mark.parametrize("method", ["em"] + SPLIT_STO)
def test_stochastic_weak_convergence_on_gaussian(method):
    sde = PSLD()
    model = gaussian_target(sde)
    cps = METHODS[method].calls_per_step
    nfes = [1 + cps * n for n in (100, 200, 400)]
    errs = []
    for nfe in nfes:
        m, v = exact_output_moments(sde, model, method, nfe)
        errs.append(abs(m - 0.5) + abs(v - 0.49))
    s = slope(nfes, errs)
    assert errs[-1] < 0.04 and 0.7 <= s <= 1.5, (errs, s)


@pytest.mark.parametrize("method", ["roba", "sps", "cspss", "sscs", "noba"])
def test_stochastic_reproducible_and_moments(method):
    sde = PSLD()
    model = gaussian_target(sde)
    n = 2000
    zT = sde.prior_sample((n, 1), generator=torch.Generator().manual_seed(0))
    cps = METHODS[method].calls_per_step
    s = Sampler(sde, method, nfe=1 + cps * 50)
    a = s.sample(model, zT, generator=torch.Generator().manual_seed(7))
    b = s.sample(model, zT, generator=torch.Generator().manual_seed(7))
    c = s.sample(model, zT, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = a.double().flatten()
    mean_exact, var_exact = exact_output_moments(sde, model, method, 1 + cps * 50)
    # Monte-Carlo: the sample moments match the sampler's own exact moments within 5 SE ...
    assert abs(float(x.mean()) - mean_exact) < 5 * math.sqrt(var_exact / n)
    assert abs(float(x.var()) - var_exact) < 5 * var_exact * math.sqrt(2 / (n - 1))
    # ... and those are the data's N(0.5, 0.7^2) up to the integrator's small bias
    # (first-order weak bias at 50 steps: at most 0.03 in the mean, 0.08 in the variance)
    assert abs(mean_exact - 0.5) < 0.035 and abs(var_exact - 0.49) < 0.09
