"""Integrator coefficient tables (SPEC §1, §4): the Python face of torch.ops.fastint.coefficients.

An integrator is its table. Row r belongs to the r-th model call, made at time ``times[r]``,
and holds the per-pixel affine update  z' = P z + Σ_j Q_j ε_{r−j} + S ξ  as
``[P00 P01 P10 P11, S00 S10 S11, Q0_00 Q0_01 Q0_10 Q0_11, Q1_.., ...]`` (width 7 + 4K; VP uses
the 00 entries only). The C++ op computes it in float64 (csrc/coefficients.cpp);
``reference_table`` recomputes it here from the Python process maths and scipy's adaptive
quadrature, as the test oracle. Derivations: docs/integrators.md.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import _ext

_ext.load()  # defines torch.ops.fastint.* (no-op when already loaded)

__all__ = ["GRIDS", "METHODS", "TUNED", "MethodInfo", "build_table", "reference_table", "reference_grid"]

GRIDS = ("uniform", "quadratic", "logsnr", "edm")
TUNED = "tuned"  # an option default looked up per (process, NFE) in fastint.tuning
EDM_RHO = 7.0
_F64 = torch.float64


@dataclass(frozen=True)
class MethodInfo:
    """What the sampler needs to know about a method: model calls per step, how many past ε
    a row reads (K), whether it injects noise, and its float options in the op's order."""

    name: str
    calls_per_step: int
    history: int
    stochastic: bool
    options: tuple = ()
    summary: str = ""
    order: str = ""
    defaults: tuple = ()  # default value of each option, same order as `options`; TUNED: see fastint.tuning
    vp_only: bool = False  # defined for VP (dim 1) only
    aug_only: bool = False  # defined for phase-space processes (PSLD, CLD) only
    prologue: int = 0  # leading table rows that make no model call (time NaN)


METHODS = {
    m.name: m
    for m in (
        MethodInfo("euler", 1, 1, False, (), "Euler on the probability-flow ODE", "1"),
        MethodInfo("em", 1, 1, True, (), "Euler–Maruyama on the reverse SDE", "1/2 strong, 1 weak"),
        MethodInfo("ddim", 1, 1, False, (), "conjugate integrator with B = 0 (exponential integrator; DDIM on VP)", "1"),
        MethodInfo("lambda_ddim", 1, 1, False, ("lam", "b"),
                   "conjugate integrator with B = lam*I, or lam*ones(2,2) with b='ones' (lam = 0: ddim); "
                   "unset lam / b take the values tuned per process and NFE (fastint.tuning)", "1",
                   (TUNED, TUNED)),
        MethodInfo("sddim", 1, 1, True, ("eta",),
                   "stochastic DDIM (VP only), eta in [0, 1]: 0 = ddim, 1 = DDPM-like ancestral", "1 (weak)",
                   (1.0,), vp_only=True),
        MethodInfo("conj_ms", 1, 3, False, ("k", "corrector", "interp"),
                   "conjugate multistep: B = 0, eps interpolated through the last k outputs in t (VP: DEIS tAB) or in "
                   "log(sigma/alpha) (interp='logsnr'); corrector='every' (k <= 2) adds an Adams-Moulton correction "
                   "carried by the next row (no extra call). Best measured on VP: k=2, corrector='every', "
                   "interp='logsnr'",
                   "k (every: k+1)", (2, "none", "t")),
        # Splitting integrators (phase space only; docs/integrators.md §6). n*: naive (a model
        # call before every sub-flow), r*: reduced (one call per step, reused), c*: conjugate
        # splitting (each sub-flow's linear part and score term integrated exactly).
        MethodInfo("nse", 2, 1, False, ("first",), "naive symplectic Euler (x-flow and m-flow, a model call before each)",
                   "1", ("x",), aug_only=True),
        MethodInfo("nvv", 3, 1, False, (), "naive velocity Verlet (m/2, x, m/2, a model call before each)", "1",
                   aug_only=True),
        MethodInfo("rse", 1, 1, False, ("first",), "reduced symplectic Euler (one model call per step, reused)", "1",
                   ("x",), aug_only=True),
        MethodInfo("rvv", 1, 1, False, (), "reduced velocity Verlet (one model call per step, reused)", "1",
                   aug_only=True),
        MethodInfo("cse", 1, 1, False, ("first",), "conjugate symplectic Euler: each sub-flow integrated exactly", "1",
                   ("x",), aug_only=True),
        MethodInfo("cvv", 1, 1, False, (), "conjugate velocity Verlet: each sub-flow integrated exactly", "1",
                   aug_only=True),
        MethodInfo("cspsd", 1, 1, False, (), "recommended deterministic splitting sampler: conjugate velocity Verlet "
                   "(cvv), chosen by measurement", "1", aug_only=True),
        MethodInfo("noba", 2, 1, True, (), "naive O-B-A stochastic splitting (a model call before B and A)",
                   "1 (weak)", aug_only=True, prologue=1),
        MethodInfo("nbao", 2, 1, True, (), "naive B-A-O stochastic splitting", "1 (weak)", aug_only=True),
        MethodInfo("nobab", 3, 1, True, (), "naive O-B/2-A-B/2 stochastic splitting", "1 (weak)", aug_only=True,
                   prologue=1),
        MethodInfo("roba", 1, 1, True, (), "reduced O-B-A (one model call per step, reused)", "1 (weak)",
                   aug_only=True),
        MethodInfo("sps", 1, 1, True, ("lam_s",), "reduced O-B-A with the position noise scaled by lam_s",
                   "1 (weak)", (None,), aug_only=True),
        MethodInfo("cspss", 1, 1, True, (), "conjugate stochastic splitting: m/2, x, m/2 flows of the reverse SDE "
                   "each solved exactly in distribution", "1 (weak)", aug_only=True),
        MethodInfo("sscs", 1, 1, True, (), "symmetric splitting CLD sampler (Dockhorn et al.): exact linear half "
                   "steps around an Euler score step", "1 (weak)", aug_only=True, prologue=1),
    )
}

# The recommended splitting samplers, chosen by measurement (docs/results.md, bench/study_splitting.py):
# cspsd is this conjugate-splitting method with these options, and sps's default lam_s.
# (cvv: lowest geometric-mean endpoint error over the 2-D and 16-D PSLD/CLD mixtures from 10 NFE
# on; cse with the x-flow first is better on the 2-D mixtures below 35 NFE but worse on 16-D.)
CSPSD = ("cvv", {})
SPS_LAM_S = 1.0

def cspsd_method(nfe):
    """(method, options) that cspsd stands for at ``nfe`` model calls (measured choice)."""
    return CSPSD


# String-valued options and their float codes in the op's options list.
_OPTION_CODES = {"b": {"identity": 0.0, "ones": 1.0}, "first": {"x": 0.0, "m": 1.0},
                 "corrector": {"none": 0.0, "start": 1.0, "every": 2.0}, "interp": {"t": 0.0, "logsnr": 1.0}}


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def check_names(sde, method, grid):
    """The process, method and grid a table is built for: TypeError / ValueError if unknown."""
    if not hasattr(sde, "process_tensor"):
        raise TypeError(f"sde must be a fastint process (VPSDE, PSLD, CLD), got {type(sde).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {grid!r}")
    if METHODS[method].vp_only and sde.dim != 1:
        raise ValueError(f"method {method!r} is defined for VP only, got {type(sde).__name__}")
    if METHODS[method].aug_only and sde.dim != 2:
        raise ValueError(f"method {method!r} splits position and momentum: it needs PSLD or CLD, "
                         f"got {type(sde).__name__}")


def _check_args(sde, method, grid, n_steps, t_eps, denoise, options):
    """Validate build_table's arguments; returns (MethodInfo, t_eps, option list)."""
    check_names(sde, method, grid)
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if isinstance(t_eps, bool) or not isinstance(t_eps, numbers.Real):
        raise TypeError(f"t_eps must be a float, got {type(t_eps).__name__}")
    t_eps = float(t_eps)
    if not (math.isfinite(t_eps) and 0.0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T) with T = {sde.T}, got {t_eps}")
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    info = METHODS[method]
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise TypeError(f"method {method!r} takes options {list(info.options)}, got unknown {unknown}")
    values = dict(zip(info.options, info.defaults))
    if method == "sps":
        values["lam_s"] = SPS_LAM_S
    values.update(options)
    if method == "lambda_ddim":
        _resolve_tuned(sde, int(n_steps) * info.calls_per_step + int(denoise), values)
    if method == "conj_ms" and values.get("corrector") == "every" and values.get("k") == 3:
        raise ValueError("option corrector='every' needs k <= 2 (its correction reads k + 1 past outputs; "
                         "a table row holds 3), got k=3")
    missing = [k for k in info.options if k not in values]
    if missing:
        raise TypeError(f"method {method!r} needs options {missing}")
    return info, t_eps, [_encode_option(method, k, values[k]) for k in info.options]


def _is_tuned(value):
    return isinstance(value, str) and value == TUNED


def _resolve_tuned(sde, nfe, values):
    """Fill lambda_ddim's TUNED defaults in ``values`` from fastint.tuning (measured by
    bench/tune_lambda.py; docs/tuning.md). Both unset: the tuned (lam, b) for this process and
    NFE. Only b given: the lam tuned for that b. Only lam given: b = "identity", as before
    tuning existed, so an explicit lam keeps one meaning at every NFE."""
    lam_unset, b_unset = _is_tuned(values["lam"]), _is_tuned(values["b"])
    if not (lam_unset or b_unset):
        return
    from .tuning import tuned_lambda

    if lam_unset:
        b = None if b_unset else values["b"]
        lam, b = tuned_lambda(sde, nfe, b=b if isinstance(b, str) else None)
        values["lam"] = lam
        if b_unset:
            values["b"] = b
    else:
        values["b"] = "identity"


def _encode_option(method, name, value):
    """One option as the op's float, with TypeError / ValueError naming the option."""
    if name in _OPTION_CODES:
        codes = _OPTION_CODES[name]
        if not isinstance(value, str):
            raise TypeError(f"option {name} must be a str, one of {list(codes)}, got {type(value).__name__}")
        if value not in codes:
            raise ValueError(f"option {name} must be one of {list(codes)}, got {value!r}")
        return codes[value]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"option {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"option {name} must be finite, got {value}")
    if name == "eta" and not 0.0 <= value <= 1.0:
        raise ValueError(f"option eta must lie in [0, 1], got {value}")
    if name == "lam_s" and not 0.0 <= value <= 1.0:
        raise ValueError(f"option lam_s must lie in [0, 1], got {value}")
    if name == "k" and value not in (1.0, 2.0, 3.0):
        raise ValueError(f"option k must be 1, 2 or 3, got {value}")
    return value


def build_table(sde, method, grid, n_steps, t_eps=1e-3, denoise=False, **options):
    """The float64 table of ``method`` on ``grid`` with ``n_steps`` steps from T down to t_eps.

    Returns ``(table [R, W], times [R])`` on the CPU, R = prologue + n_steps * calls_per_step +
    denoise rows (a prologue row makes no model call; its time is NaN), W = 7 + 4 * history. ``denoise=True`` appends the Tweedie row at t_eps.
    Tables are cached per (process, method, grid, n_steps, t_eps, denoise, options); the
    returned tensors are fresh copies.
    """
    if method == "cspsd":
        if options:
            raise TypeError(f"method 'cspsd' takes no options, got {sorted(options)}")
        check_names(sde, method, grid)
        method, options = cspsd_method(int(n_steps) + int(bool(denoise)))
    info, t_eps, opts = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
    key = (sde.cache_key(), method, grid, int(n_steps), t_eps, denoise, tuple(opts))
    hit = _CACHE.get(key)
    if hit is None:
        times, table = torch.ops.fastint.coefficients(
            sde.process_tensor, sde.knots, method, grid, int(n_steps), t_eps, float(sde.T), denoise, opts
        )
        hit = (table, times)
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit[0].clone(), hit[1].clone()


@torch.library.register_fake("fastint::coefficients")
def _coefficients_fake(process, knots, method, grid, n_steps, t_eps, T, denoise, options):
    """Output shapes without computing: R = n_steps * calls_per_step + denoise rows, 7 + 4K columns."""
    info = METHODS.get(method)
    if info is None:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    rows = info.prologue + n_steps * info.calls_per_step + int(denoise)
    return process.new_empty(rows), process.new_empty(rows, 7 + 4 * info.history)


# --------------------------------------------------------------------------- reference
def _nsr(sde, b):
    """x-marginal noise-to-signal ratio L11/Ψ00 at B = b (VP: σ/α)."""
    t = sde.inv_int_beta(b).clamp(max=sde.T)  # B⁻¹(B(T)) may round above T
    L11 = sde.cholesky(t)[..., 0, 0]
    return L11 / sde.transition(t, 0.0)[..., 0, 0]


def reference_grid(sde, grid, n_steps, t_eps=1e-3) -> torch.Tensor:
    """Times T = t_0 > ... > t_N = t_eps of a grid, float64, from the Python process maths.

    uniform / quadratic: t_i = t_ε + (T − t_ε)(1 − i/N) or (1 − i/N)²; logsnr: uniform in
    log(L11/Ψ00) (= −log-SNR; VP: σ/α); edm: uniform in (L11/Ψ00)^{1/7}. Phase-space grids
    invert the ratio by bisection in B.
    """
    _check_args(sde, "euler", grid, n_steps, t_eps, False, {})
    T, N = sde.T, int(n_steps)
    s = torch.arange(N + 1, dtype=_F64) / N
    if grid in ("uniform", "quadratic"):
        t = t_eps + (T - t_eps) * ((1 - s) if grid == "uniform" else (1 - s) ** 2)
    else:
        b_lo, b_hi = sde.int_beta(t_eps), sde.int_beta(T)
        r_hi, r_lo = _nsr(sde, b_hi), _nsr(sde, b_lo)
        if grid == "logsnr":
            target = (1 - s) * torch.log(r_hi) + s * torch.log(r_lo)
        else:
            a, c = r_hi ** (1 / EDM_RHO), r_lo ** (1 / EDM_RHO)
            target = EDM_RHO * torch.log(a + s * (c - a))
        if sde.dim == 1:  # σ/α = √(e^B − 1)
            b = torch.log1p(torch.exp(2 * target))
        else:
            lo, hi = torch.full_like(target, float(b_lo)), torch.full_like(target, float(b_hi))
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                up = torch.log(_nsr(sde, mid)) > target
                hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
            b = 0.5 * (lo + hi)
        t = sde.inv_int_beta(b)
    t[0], t[-1] = T, t_eps
    return t


def _ddim_Q(sde, t, t1, epsrel, weight=None):
    """Q_n = −∫_{t'}^{t} w(u) Ψ(t', u) ½β(u) D L_u^{−T} du for all steps at once (w = 1 unless
    ``weight(u) -> [N]`` is given), by scipy.integrate.quad_vec over s ∈ [0, 1] with
    u = t' + s(t − t'); each entry is scaled to O(1) first so that the 'max'-norm tolerance is
    a relative tolerance on every entry."""
    from scipy.integrate import quad_vec

    h = t - t1
    D = sde.D

    def f(s):
        u = t1 + s * h
        Psi = sde.transition(t1, u)
        w = torch.ones_like(u) if weight is None else weight(u)
        return (-0.5 * h * sde.beta(u) * w)[:, None, None] * (Psi @ D @ sde.inv_chol_T(u))

    probe = torch.stack([f(s).abs() for s in (0.0, 0.3, 0.5, 0.7, 1.0)]).amax(0)
    scale = torch.where(probe > 0, probe, torch.ones_like(probe))
    val, err = quad_vec(lambda s: (f(s) / scale).flatten().numpy(), 0.0, 1.0, epsabs=0.0, epsrel=epsrel,
                        norm="max", limit=20000)
    return torch.from_numpy(val).reshape(scale.shape) * scale


def _ones_step(sde, lam, t, t1, rtol=1e-13):
    """(U(t', t), Q) for B = lam·ones by one DOP853 solve of dU/du = U (B − F_u), U(t') = I,
    together with dQ/du = −U ½β(u) D L_u^{−T}, from u = t' to t (scipy; test oracle)."""
    from scipy.integrate import solve_ivp

    Bm = torch.full((2, 2), float(lam), dtype=_F64)
    A, D = 0.5 * sde.Fbar, sde.D

    def rhs(u, y):
        U = torch.from_numpy(y[:4]).reshape(2, 2)
        ut = torch.tensor([u], dtype=_F64)
        be = float(sde.beta(ut))
        dU = U @ (Bm - be * A)
        dQ = -0.5 * be * (U @ D @ sde.inv_chol_T(ut)[0])
        return torch.cat([dU.reshape(4), dQ.reshape(4)]).numpy()

    y0 = torch.cat([torch.eye(2, dtype=_F64).reshape(4), torch.zeros(4, dtype=_F64)]).numpy()
    sol = solve_ivp(rhs, (float(t1), float(t)), y0, method="DOP853", rtol=rtol, atol=1e-18)
    y = torch.from_numpy(sol.y[:, -1].copy())
    return y[:4].reshape(2, 2), y[4:].reshape(2, 2)


def _lagrange(nodes, j, var=None):
    """Lagrange basis polynomial ℓ_j through ``nodes`` (python floats), as a function of a tensor;
    with ``var``, a polynomial in var(u) through var(nodes)."""
    var = var or (lambda u: u)
    vn = [float(var(torch.tensor([tm], dtype=_F64))[0]) for tm in nodes]

    def l(u):
        v = var(u)
        out = torch.ones_like(u)
        for m, tm in enumerate(vn):
            if m != j:
                out = out * (v - tm) / (vn[j] - tm)
        return out
    return l


def _log_nsr(sde):
    """u -> log(L11 / Psi00) at time u: the x-marginal log noise-to-signal ratio (VP: log sigma/alpha)."""
    return lambda u: torch.log(sde.cholesky(u)[:, 0, 0] / sde.transition(u, 0.0)[:, 0, 0])


def reference_table(sde, method, grid, n_steps, t_eps=1e-3, denoise=False, epsrel=1e-13, **options):
    """float64 (table, times) like build_table, from the Python maths (scipy; test oracle)."""
    info, t_eps, _ = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
    tg = reference_grid(sde, grid, n_steps, t_eps)
    t, t1 = tg[:-1], tg[1:]
    h = t - t1
    d = sde.dim
    N = t.numel()
    eye = torch.eye(d, dtype=_F64)
    S = torch.zeros(N, d, d, dtype=_F64)
    carry = None  # conj_ms corrector: the last step's correction, applied by the denoising row
    if method in ("euler", "em"):
        be = sde.beta(t)[:, None, None]
        hb = h[:, None, None] * be
        P = eye - hb * (0.5 * sde.Fbar)
        Q = (-0.5 if method == "euler" else -1.0) * hb * (sde.D @ sde.inv_chol_T(t))
        if method == "em":
            S = torch.sqrt(hb * sde.D)  # D is diagonal
    elif method == "ddim":
        P = sde.transition(t1, t)
        if d == 1:  # textbook DDIM: x' = (α'/α) x + (σ' − α'σ/α) ε
            Q = (sde.sigma(t1) - sde.alpha(t1) * sde.sigma(t) / sde.alpha(t))[:, None, None]
        else:
            Q = _ddim_Q(sde, t, t1, epsrel)
    elif method == "lambda_ddim":
        _, _, (lam, bcode) = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
        if bcode == 1.0 and d == 2:
            steps = [_ones_step(sde, lam, t[n], t1[n]) for n in range(N)]
            Bm = torch.full((2, 2), lam, dtype=_F64)
            P = torch.stack([U @ (eye - h[n] * Bm) for n, (U, _) in enumerate(steps)])
            Q = torch.stack([q for _, q in steps])
        else:  # B = lam I commutes with F: U(t', u) = e^{lam (u − t')} Ψ(t', u)
            P = (torch.exp(lam * h) * (1 - lam * h))[:, None, None] * sde.transition(t1, t)
            if lam == 0.0 and d == 1:  # e^0 = 1: the textbook DDIM coefficient
                Q = (sde.sigma(t1) - sde.alpha(t1) * sde.sigma(t) / sde.alpha(t))[:, None, None]
            else:
                Q = _ddim_Q(sde, t, t1, epsrel, weight=lambda u: torch.exp(lam * (u - t1)))
    elif method == "sddim":
        _, _, (eta,) = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
        if d != 1:
            raise ValueError("method 'sddim' is defined for VP only")
        # DDIM's eq. (16) in alphas_cumprod: a2 = ᾱ_t, a2p = ᾱ_{t'}
        a2, a2p = sde.alpha(t) ** 2, sde.alpha(t1) ** 2
        sig = eta * torch.sqrt((1 - a2p) / (1 - a2) * (1 - a2 / a2p))
        P = torch.sqrt(a2p / a2)[:, None, None]
        Q = (torch.sqrt(1 - a2p - sig**2) - torch.sqrt(a2p) * torch.sqrt(1 - a2) / torch.sqrt(a2))[:, None, None]
        S = sig[:, None, None]
    elif method == "conj_ms":
        _, _, (k, corr, interp) = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
        var = _log_nsr(sde) if interp == 1.0 else None
        P = sde.transition(t1, t)
        Q = torch.zeros(N, info.history, d, d, dtype=_F64)
        for n in range(N):
            nodes = [float(tg[n - m]) for m in range(min(int(k), n + 1))]
            for j in range(len(nodes)):
                Q[n, j] = _ddim_Q(sde, t[n:n + 1], t1[n:n + 1], epsrel, weight=_lagrange(nodes, j, var))[0]
        Qp = Q.clone()
        for n in range(N):  # step n's correction, carried by row n + 1 or the denoising row (integrators.md §3)
            cnt = min(int(k) + 1, n + 2) if corr == 2.0 else (2 if corr == 1.0 and n == 0 and k >= 2 else 0)
            if cnt == 0:
                continue
            nodes = [float(tg[n + 1 - m]) for m in range(cnt)]
            D = torch.zeros(info.history, d, d, dtype=_F64)
            for j in range(cnt):
                D[j] = _ddim_Q(sde, t[n:n + 1], t1[n:n + 1], epsrel, weight=_lagrange(nodes, j, var))[0]
            D[1:] -= Qp[n, :-1]
            if n + 1 < N:
                Q[n + 1] += P[n + 1] @ D
            else:
                carry = D
    else:  # pragma: no cover - METHODS and this function grow together
        raise NotImplementedError(method)
    if Q.dim() == 3:
        Q = Q[:, None]
    Q = torch.nn.functional.pad(Q, (0, 0, 0, 0, 0, info.history - Q.shape[1]))
    rows = [P, S, Q]
    times = t
    if denoise:
        te = tg[-1:]
        Psi, L, Li = sde.transition(te, 0.0), sde.cholesky(te), sde.inv_chol_T(te)
        Pd = torch.zeros(1, d, d, dtype=_F64)
        Qd = torch.zeros(1, info.history, d, d, dtype=_F64)
        Pd[:, 0, 0] = 1 / Psi[:, 0, 0]
        Qd[:, 0, 0, 0] = -L[:, 0, 0] / Psi[:, 0, 0]
        if d == 2:  # E[m0 | z] = κM (Ψ e_m)ᵀ L^{-T} ε
            Qd[:, 0, 1] = sde.kappa * sde.M * (Psi[:, :, 1, None] * Li).sum(1)
        if carry is not None:
            Qd[0] += Pd[0] @ carry
        rows = [torch.cat([a, b]) for a, b in zip(rows, (Pd, torch.zeros(1, d, d, dtype=_F64), Qd))]
        times = torch.cat([t, te])
    P, S, Q = rows
    R = times.numel()
    table = torch.zeros(R, 7 + 4 * info.history, dtype=_F64)
    full = lambda M: M if d == 2 else torch.nn.functional.pad(M, (0, 1, 0, 1))  # noqa: E731
    P, S, Q = full(P), full(S), full(Q)
    table[:, 0:4] = P.reshape(R, 4)
    table[:, 4], table[:, 5], table[:, 6] = S[:, 0, 0], S[:, 1, 0], S[:, 1, 1]
    table[:, 7:] = Q.reshape(R, 4 * info.history)
    return table, times
