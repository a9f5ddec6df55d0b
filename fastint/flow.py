"""Flow matching (rectified flow): the Gaussian path x_σ = (1 − σ) x0 + σ ε and its tables
(docs/design.md, "Flow matching"; derivation: docs/integrators.md §8).

The path has α = 1 − σ, so it is a VP path with the same signal-to-noise ratio up to a scale:
with c(σ) = √((1 − σ)² + σ²), the flow state is x = c · z for the VP state z whose
α_v = (1 − σ)/c and σ_v = σ/c. ε and x0 are the same in both frames. So every flow table is a
VP table on a discrete schedule whose knots hold the flow's sigmas, with its rows rescaled by c
(as fastint.k_diffusion does for the VE frame). The model predicts the velocity v = ε − x0 and
the path starts at pure noise, σ = 1, where α = 0: there the ε frame is singular (x0 cannot be
read from ε), so flow tables are always in the data frame: the history holds x̂0 = x − σ v, and
the step is the exponential integrator in x0 (DPM-Solver++'s frame). DDIM in that frame is
exactly Euler on dx/dσ = v, i.e. diffusers' FlowMatchEulerDiscreteScheduler.

The process time *is* σ (T = 1); ``shift`` only shapes the named grids, as in SD3 and Flux:
σ = shift·u / (1 + (shift − 1)·u) for grid points u.
"""
from __future__ import annotations


import numpy as np
import torch

from . import grids
from .checks import is_int
from .methods import METHODS
from .processes import VPSDE, _param
from .table import Table, check_table, make_table

__all__ = ["FlowMatch", "flow_table", "FLOW_METHODS", "PREDICTIONS_FLOW", "shift_sigmas", "flow_grid"]

_F64 = torch.float64
PREDICTIONS_FLOW = ("flow", "x0")
# Methods on a flow path (all deterministic, all in the data frame): euler and ddim are the same
# map here (Euler on dx/dσ = v); conj_ms takes its options except predict (always 'x0').
FLOW_METHODS = tuple(name for name, info in METHODS.items() if info.flow)
FLOW_GRIDS = ("uniform", "leading", "quadratic", "karras", "edm", "exponential", "logsnr", "beta")
# The VP knot of σ = 1 (α = 0, infinite B) is placed at σ = 1 − _DELTA; the first row, the only
# one that starts there, is then replaced by its exact value (Euler from σ = 1 is exact in x0).
_DELTA = 1e-9
MIN_SIGMA = 1e-7  # the smallest model sigma: the VP ᾱ = (1 − σ)²/c² must stay below 1 in float64
# interp on a flow path: the variable x̂0 is interpolated in: σ² (x̂0 = x(0) + O(σ²) along the
# ODE: docs/integrators.md §8), σ, the step index, or λ = log((1 − σ)/σ) (DPM-Solver++'s); the
# default is the one measured best (docs/results.md, "Flow matching").
FLOW_INTERP = ("sigma2", "sigma", "index", "logsnr")
DEFAULT_INTERP = "sigma2"
_OP_INTERP = {"sigma2": "flow2", "sigma": "flow", "index": "t", "logsnr": "logsnr"}  # the op's conj_ms interp for each


def shift_sigmas(u, shift):
    """σ = shift·u / (1 + (shift − 1)·u): SD3's timestep shift (shift > 1 spends more steps at high noise)."""
    u = torch.as_tensor(u, dtype=_F64)
    return shift * u / (1 + (shift - 1) * u)


class FlowMatch:
    """The rectified-flow path x_σ = (1 − σ) x0 + σ ε, σ ∈ [0, 1] (SD3, Flux, Wan, ...).

    Args:
        shift: the timestep shift of the named grids (σ = shift·u/(1 + (shift − 1)u) at grid
            points u), in [2^-24, 2^24]; 1 is no shift. It does not change the process: the model is
            called with σ itself, the process time.

    The model predicts the velocity v = ε − x0 (``prediction="flow"``) or x0 (``"x0"``); the
    probability-flow ODE is dx/dσ = v. The prior at σ = 1 is N(0, I).
    """

    dim = 1
    T = 1.0

    def __init__(self, shift=1.0):
        shift = _param("shift", shift, low=0.0, low_open=True)
        if not 2.0**-24 <= shift <= 2.0**24:  # beyond, every grid σ is within float32 rounding of 0 or of 1
            raise ValueError(f"shift must lie in [2^-24, 2^24], got {shift:g}")
        object.__setattr__(self, "shift", shift)

    def __setattr__(self, name, value):
        raise AttributeError(f"FlowMatch is immutable: build FlowMatch(shift=...) instead of setting {name!r}")

    def __repr__(self):
        return f"FlowMatch(shift={self.shift})"

    def cache_key(self):
        return ("FlowMatch", self.shift)

    # ---- the path --------------------------------------------------------------------------
    def _sig(self, t):
        t = torch.as_tensor(t, dtype=_F64)
        if t.numel() and (not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(f"sigma must lie in [0, 1], got values in [{float(t.min())}, {float(t.max())}]")
        return t

    def alpha(self, t) -> torch.Tensor:
        """α = 1 − σ."""
        return 1 - self._sig(t)

    def sigma(self, t) -> torch.Tensor:
        """σ = t (the process time is the noise level)."""
        return self._sig(t).clone()

    def log_snr(self, t) -> torch.Tensor:
        """λ = log((1 − σ)/σ)."""
        s = self._sig(t)
        return torch.log1p(-s) - torch.log(s)

    def marginal_sample(self, x0, eps, t):
        """x_σ = (1 − σ) x0 + σ ε (``t``: a float or one σ per batch element)."""
        s = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1)) if s.ndim else s
        return (1 - s) * x0 + s * eps

    def velocity_to_x0(self, v, x, t):
        """x̂0 = x − σ v."""
        s = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        s = s.reshape((-1,) + (1,) * (x.ndim - 1)) if s.ndim else s
        return x - s * v

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device=None):
        """A draw from the prior N(0, I) at σ = 1, of the data shape [B, C, ...]."""
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)

    def data_part(self, z):
        return z


def flow_grid(sde, grid, n_steps, t_eps=1e-3):
    """Named-grid sigmas 1 = σ_0 > ... > σ_N = shift(t_eps), float64: ``uniform`` /
    ``quadratic`` / ``leading`` (uniform, σ_0 one step below 1: fastint.grids) in u (then shifted: diffusers' FlowMatch schedule is ``uniform`` with t_eps =
    shift(1/num_train_timesteps), since it shifts its training range and then the grid), or Karras / exponential (= logsnr here: uniform in log σ) / beta in σ
    on [shift(t_eps), 1], as diffusers' FlowMatchEulerDiscreteScheduler converts its sigmas."""
    if not isinstance(grid, str) or grid not in FLOW_GRIDS:
        raise ValueError(f"grid must be one of {list(FLOW_GRIDS)} or a sequence of sigmas, got {grid!r}")
    if not is_int(n_steps) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    t_eps = _param("t_eps", t_eps)
    if not 0 < t_eps < 1:
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps}")
    n = int(n_steps)
    s = 1 - torch.arange(n + 1, dtype=_F64) / n
    if grid == "leading":  # the last n + 1 of n + 2 uniform points: the model is not called at σ = 1
        s = 1 - torch.arange(1, n + 2, dtype=_F64) / (n + 1)
    if grid in ("uniform", "quadratic", "leading"):
        u = t_eps + (1 - t_eps) * (s if grid != "quadratic" else s * s)
        sig = shift_sigmas(u, sde.shift)
    else:
        lo = float(shift_sigmas(t_eps, sde.shift))
        fn = {"karras": grids.karras_sigmas, "edm": grids.karras_sigmas, "exponential": grids.exponential_sigmas,
              "logsnr": grids.exponential_sigmas, "beta": grids.beta_sigmas}[grid]
        sig = torch.as_tensor(np.asarray(fn(1.0, lo, n + 1)), dtype=_F64)
    if grid != "leading":
        sig[0] = 1.0
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"grid {grid!r} with n_steps={n} is not strictly decreasing")
    return sig


def _flow_sigmas(sigmas, denoise):
    """The table sigmas as a float64 tensor, checked: strictly decreasing in [MIN_SIGMA, 1], and at
    least 2 of them unless ``denoise``."""
    sig = grids.as_times(FlowMatch(), sigmas, name="sigmas")
    if float(sig[-1]) < MIN_SIGMA:
        raise ValueError(f"sigmas (or t_eps) must be >= {MIN_SIGMA:g}, got {float(sig[-1]):g}: below that 1 - sigma "
                         "rounds to 1 and the state is the data itself (end the schedule with 0 instead)")
    if sig.numel() < 2 and not denoise:
        raise ValueError("sigmas must hold at least 2 entries (model sigmas, then the final one) unless denoise=True")
    return sig


def _sddim_table(sigmas, denoise, eta=1.0):
    """Stochastic DDIM on the flow path, in the data frame (docs/integrators.md §8): from
    (a, s) = (1 − σ, σ) to (a', s'), x' = a' x̂0 + √(s'² − ς²) ε̂ + ς ξ with ε̂ = (x − a x̂0)/s and
    ς = η s' √(1 − SNR/SNR'), SNR = a²/s² (the DDPM posterior's spread, scaled by η). Finite at
    σ = 1 (a = 0, ε̂ = x), so no special first row; η = 0 is Euler exactly."""
    eta = _param("eta", eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"option eta must lie in [0, 1], got {eta}")
    sig = _flow_sigmas(sigmas, denoise)
    a, s = 1 - sig[:-1], sig[:-1]
    a1, s1 = 1 - sig[1:], sig[1:]
    ratio = (a * s1) ** 2 / (s * a1) ** 2  # SNR / SNR' in [0, 1)
    spread = eta * s1 * torch.sqrt(torch.clamp(1 - ratio, min=0.0))
    P = torch.sqrt(torch.clamp(s1**2 - spread**2, min=0.0)) / s
    rows = torch.zeros(sig.numel() - 1 + int(denoise), 11, dtype=_F64)
    rows[: len(P), 0], rows[: len(P), 4], rows[: len(P), 7] = P, spread, a1 - a * P
    if denoise:
        rows[-1, 7] = 1.0  # the x0 row: x̂0 at the last sigma
    check_table(rows, f"FlowMatch with method 'sddim' and eta={eta}")
    return Table(rows, sig[: len(rows)].clone(), 1, "sddim", (eta,), None)


def flow_table(sigmas, method="conj_ms", denoise=False, **options) -> Table:
    """The Table of ``method`` on the flow path, acting on the flow state x, one row per sigma
    but the last (plus the x0 row with ``denoise``, which ends at σ = 0).

    ``sigmas``: strictly decreasing in (0, 1] (float64 tensor or sequence): the model is called
    at each but the last, step n goes from sigmas[n] to sigmas[n + 1]; with ``denoise`` the last
    is also a model sigma and the last row maps it to x̂0 (σ = 0). The history holds x̂0 = x − σ v
    (the caller converts the model output; ``Table.history_conv`` is None). ``method``: one of
    FLOW_METHODS; ``conj_ms`` options k, corrector, lower_final and interp (FLOW_INTERP: 'sigma',
    'index' (the step index) or 'logsnr'; default DEFAULT_INTERP).
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {list(FLOW_METHODS)} on a flow-matching path, got {method!r}")
    if method == "sddim":
        return _sddim_table(sigmas, denoise, **options)
    if method in ("euler", "ddim"):
        if options:
            raise TypeError(f"method {method!r} takes no options, got {sorted(options)}")
        options = {"k": 1, "interp": "index"}  # one point: the variable does not matter
    interp = options.pop("interp", DEFAULT_INTERP)
    if interp not in FLOW_INTERP:
        raise ValueError(f"option interp must be one of {list(FLOW_INTERP)} on a flow-matching path, got {interp!r}")
    options["interp"] = _OP_INTERP[interp]
    if options.get("predict", "x0") != "x0":
        raise ValueError("predict must be 'x0' on a flow-matching path: at sigma = 1 (alpha = 0) the eps frame "
                         "is singular, so flow tables interpolate the data predictions")
    options = {**options, "predict": "x0"}
    sig = _flow_sigmas(sigmas, denoise)
    if bool(sig[0] == 1.0) and sig.numel() > 1 and interp == "logsnr" and options.get("k", 2) > 1:
        # log-SNR interpolation: σ = 1 is the node λ = −∞, and the polynomial through it is, in the
        # limit, the one through the other nodes. So: the exact Euler row from σ = 1, then the
        # table on the remaining sigmas with its own (fresh) history.
        head = flow_table(sig[:2], "euler")
        tail = flow_table(sig[1:], method, denoise=denoise, **{**options, "interp": interp})
        coef = torch.zeros(len(tail) + 1, tail.coef.shape[1], dtype=_F64)
        coef[0, : head.coef.shape[1]] = head.coef[0]
        coef[1:] = tail.coef
        return Table(coef, torch.cat([sig[:1], tail.times]), 1, tail.method, tail.options, None)
    vp_sig = sig.clone()
    exact_first = bool(sig[0] == 1.0)
    if exact_first:
        vp_sig[0] = 1 - _DELTA
        if sig.numel() > 1 and float(sig[1]) >= 1 - _DELTA:
            raise ValueError(f"sigmas[1] must be < 1 - {_DELTA:g} when sigmas[0] = 1, got {float(sig[1])!r}")
    c = torch.sqrt((1 - vp_sig) ** 2 + vp_sig**2)  # flow state = c * VP state
    # the VP schedule whose knots hold the sigmas, at the step index t = (K − i)/K: the op's
    # interp 'flow' (r/(1 + r), r = σ_v/α_v) is then the flow's σ exactly, 't' the step index
    K = sig.numel()
    sde = VPSDE(alphas_cumprod=(((1 - vp_sig) / c) ** 2).flip(0), T=1.0)
    times = (K - torch.arange(K, dtype=_F64)) / K
    tab = make_table(sde, "conj_ms", times, denoise=denoise, **options)
    steps = sig.numel() - 1
    c_next = torch.cat([c[1:], torch.ones(1, dtype=_F64)]) if denoise else c[1:]  # σ = 0: c = 1
    coef = tab.coef.clone()
    R = len(tab)
    coef[:, 0] *= c_next[:R] / c[:R]  # P (the x0 row has P = 0)
    coef[:, 4] *= c_next[:R]  # S (zero: deterministic)
    coef[:, 7::4] *= c_next[:R, None]  # Q_j on x̂0 (frame-free)
    if exact_first and steps > 0:
        s1 = float(sig[1])
        coef[0, 0], coef[0, 7] = s1, 1 - s1  # x' = σ' x + (1 − σ') x̂0: Euler from σ = 1, exactly
        coef[0, 11::4] = 0.0
    check_table(coef, f"FlowMatch with method {method!r} and options {options}")
    return Table(coef, sig[:R].clone(), 1, tab.method, tab.options, None)
