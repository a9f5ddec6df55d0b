"""Time grids: ways to produce the decreasing sequence of times a table is built on.

A table (fastint.table) is a function of an explicit sequence t_0 > t_1 > ... > t_N: the model
is called at t_0 .. t_{N-1} (and at t_N when the table denoises), and the last step ends at
t_N. Named grids are small functions of (process, n_steps, t_eps) returning that sequence in
float64, from T down to t_eps; a user may pass any sequence instead (docs/design.md, "Times").

- ``uniform``: uniform in t; ``quadratic``: t_eps + (T − t_eps)(1 − i/N)², dense near the data;
- ``leading``: the last N + 1 of N + 2 times uniform from T to t_eps: like diffusers' 'leading'
  spacing, the model is not called at T itself (the prior draw is taken as the state one uniform
  step below T; measured ahead of ``uniform`` at 5 calls on the shipped digits model, docs/results.md);
- ``logsnr`` (= ``exponential``): uniform in log r, r = L11/Ψ00 the x-marginal
  noise-to-signal ratio (VP: σ/α, the VE sigma; minus DPM-Solver's λ);
- ``edm`` (= ``karras``): uniform in r^{1/ρ}, ρ = 7 (Karras et al.);
- ``beta``: r at the quantiles of a Beta(0.6, 0.6) (Lee et al., "Beta Sampling is All You Need").

The sigma-space helpers (``karras_sigmas``, ``exponential_sigmas``, ``beta_sigmas``) are the
same formulas on a [sigma_max, sigma_min] range; the diffusers adapters use them to reproduce
diffusers' schedules exactly.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .checks import is_int

__all__ = ["GRIDS", "make", "as_times", "times_from_nsr", "nsr", "karras_sigmas", "exponential_sigmas",
           "beta_sigmas", "EDM_RHO"]

EDM_RHO = 7.0
_F64 = torch.float64


# --------------------------------------------------------------------------- sigma space
def karras_sigmas(sigma_max, sigma_min, n, rho=EDM_RHO):
    """n sigmas from sigma_max to sigma_min, uniform in sigma^{1/rho} (float64 numpy, as diffusers)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_max, sigma_min, n):
    """n sigmas from sigma_max to sigma_min, uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_max, sigma_min, n, a=0.6, b=0.6):
    """n sigmas from sigma_max to sigma_min at the quantiles 1 − i/(n−1) of Beta(a, b) (needs scipy)."""
    import scipy.stats

    q = 1 - np.linspace(0, 1, n)
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in scipy.stats.beta.ppf(q, a, b)])


# --------------------------------------------------------------------------- process time
def nsr(sde, t):
    """x-marginal noise-to-signal ratio r(t) = L11/Ψ00 (VP: σ/α), float64."""
    t = torch.as_tensor(t, dtype=_F64)
    if sde.dim == 1:
        return torch.sqrt(torch.expm1(sde.int_beta(t)))
    return sde.cholesky(t)[..., 0, 0] / sde.transition(t, 0.0)[..., 0, 0]


def times_from_nsr(sde, r, t_lo=None, t_hi=None):
    """Times with r(t) = r (float64 tensor): in closed form for VP (B = log(1 + r²)), by bisection
    in B on [B(t_lo), B(t_hi)] for phase space, where r is monotone."""
    r = torch.as_tensor(r, dtype=_F64)
    if sde.dim == 1:
        return sde.inv_int_beta(torch.log1p(r * r)).clamp(max=sde.T)
    t_lo = 1e-6 * sde.T if t_lo is None else t_lo
    t_hi = sde.T if t_hi is None else t_hi
    target = torch.log(r)
    lo = torch.full_like(target, float(sde.int_beta(torch.tensor(t_lo, dtype=_F64))))
    hi = torch.full_like(target, float(sde.int_beta(torch.tensor(t_hi, dtype=_F64))))
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        t = sde.inv_int_beta(mid).clamp(max=sde.T)
        up = torch.log(nsr(sde, t)) > target
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    return sde.inv_int_beta(0.5 * (lo + hi)).clamp(max=sde.T)


def _in_ratio(sde, n_steps, t_eps, sigmas_of):
    """A grid defined in r: r_i = sigmas_of(r(T), r(t_eps), N + 1), mapped back to times."""
    T = sde.T
    r_hi, r_lo = float(nsr(sde, T)), float(nsr(sde, t_eps))
    probe = torch.linspace(t_eps, T, 2001, dtype=_F64)
    if sde.dim == 2 and bool((sde.transition(probe, 0.0)[:, 0, 0] <= 0).any()):
        raise ValueError("grid: the signal coefficient Psi_00 changes sign on [t_eps, T]; "
                         "use grid='uniform' or 'quadratic' for this process")
    if not r_hi > r_lo:
        raise ValueError("grid: the noise-to-signal ratio does not increase from t_eps to T")
    r = torch.as_tensor(sigmas_of(r_hi, r_lo, n_steps + 1), dtype=_F64)
    return times_from_nsr(sde, r, t_eps, T)


def _uniform(sde, n, t_eps):
    s = 1 - torch.arange(n + 1, dtype=_F64) / n
    return t_eps + (sde.T - t_eps) * s


def _leading(sde, n, t_eps):
    s = 1 - torch.arange(1, n + 2, dtype=_F64) / (n + 1)
    return t_eps + (sde.T - t_eps) * s


def _quadratic(sde, n, t_eps):
    s = 1 - torch.arange(n + 1, dtype=_F64) / n
    return t_eps + (sde.T - t_eps) * (s * s)


def _logsnr(sde, n, t_eps):
    def sig(hi, lo, m):  # uniform in log r, written as the old op did (bit-for-bit grids)
        s = np.arange(m) / (m - 1)
        return np.exp((1 - s) * math.log(hi) + s * math.log(lo))
    return _in_ratio(sde, n, t_eps, sig)


def _edm(sde, n, t_eps):
    return _in_ratio(sde, n, t_eps, karras_sigmas)


def _beta(sde, n, t_eps):
    return _in_ratio(sde, n, t_eps, beta_sigmas)


GRIDS = {"uniform": _uniform, "leading": _leading, "quadratic": _quadratic, "logsnr": _logsnr, "edm": _edm, "karras": _edm,
         "exponential": _logsnr, "beta": _beta}


def make(sde, grid, n_steps, t_eps=1e-3):
    """Times T = t_0 > ... > t_N = t_eps of the named ``grid`` with N = ``n_steps``, float64
    ('leading': t_0 = T − (T − t_eps)/(N + 1))."""
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)} or a sequence of times, got {grid!r}")
    if not is_int(n_steps):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if isinstance(t_eps, bool) or not isinstance(t_eps, numbers.Real):
        raise TypeError(f"t_eps must be a float, got {type(t_eps).__name__}")
    t_eps = float(t_eps)
    if not (math.isfinite(t_eps) and 0.0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T) with T = {sde.T}, got {t_eps}")
    t = GRIDS[grid](sde, int(n_steps), t_eps).to(_F64)
    if grid != "leading":
        t[0] = sde.T
    t[-1] = t_eps
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"grid {grid!r} with n_steps={n_steps} and t_eps={t_eps} is not strictly decreasing "
                         "(too many steps for float64 times?)")
    return t


def as_times(sde, times, name="times"):
    """A user's sequence of times as a float64 tensor: 1-D, finite, strictly decreasing, in (0, T]."""
    if isinstance(times, (str, bytes)) or not hasattr(times, "__len__"):
        raise TypeError(f"{name} must be a grid name or a sequence of floats, got {type(times).__name__}")
    try:
        t = torch.as_tensor(times.detach().cpu() if isinstance(times, torch.Tensor) else times, dtype=_F64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a sequence of floats ({e})") from None
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or bool((t > sde.T).any()):
        raise ValueError(f"{name} must be finite and lie in (0, T] with T = {sde.T}, got {t.tolist()}")
    if bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"{name} must be strictly decreasing, got {t.tolist()}")
    return t.contiguous()
