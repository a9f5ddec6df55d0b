"""Integrator coefficient tables (docs/design.md, "Tables"): the Python face of torch.ops.fastint.coefficients.

An integrator is its table. Row r belongs to the r-th model call, made at time ``times[r]``,
and holds the per-pixel affine update  z' = P z + Σ_j Q_j ε_{r−j} + S ξ  as
``[P00 P01 P10 P11, S00 S10 S11, Q0_00 Q0_01 Q0_10 Q0_11, Q1_.., ...]`` (width 7 + 4K; VP uses
the 00 entries only). The C++ op computes it in float64 (csrc/coefficients.cpp);
``build_table`` builds it on a named grid or on explicit times;
``reference_table`` recomputes it here from the Python process maths and scipy's adaptive
quadrature, as the test oracle. Derivations: docs/integrators.md.
"""
from __future__ import annotations

import torch

from . import _ext
from . import grids as _grids
from .methods import METHODS, TUNED, MethodInfo, check_method, resolve
from .table import Table, make_table

_ext.load()  # defines torch.ops.fastint.* (no-op when already loaded)

__all__ = ["GRIDS", "METHODS", "TUNED", "MethodInfo", "build_table", "make_table", "Table", "reference_table",
           "reference_grid", "cspsd_method"]

GRIDS = tuple(_grids.GRIDS)
EDM_RHO = _grids.EDM_RHO
_F64 = torch.float64


def cspsd_method(nfe):
    """(method, options) that cspsd stands for at ``nfe`` model calls (measured choice)."""
    info = METHODS["cspsd"]
    return info.alias_of, dict(info.alias_options)


def check_names(sde, method, grid):
    """The process, method and grid a table is built for: TypeError / ValueError if unknown."""
    check_method(sde, method)
    if isinstance(grid, str) and grid not in _grids.GRIDS:
        raise ValueError(f"grid must be one of {list(_grids.GRIDS)} or a sequence of times, got {grid!r}")


def _check_args(sde, method, grid, n_steps, t_eps, denoise, options):
    """(MethodInfo, t_eps, encoded options) of build_table's arguments (TypeError / ValueError)."""
    times = _grids.make(sde, grid, n_steps, t_eps)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    _, info, opts = resolve(sde, method, int(n_steps) * METHODS[method].calls_per_step + int(denoise), options)
    return info, float(times[-1]), opts


def build_table(sde, method, grid, n_steps=None, t_eps=1e-3, denoise=False, **options):
    """float64 ``(table [R, W], times [R])`` of ``method`` on a named ``grid`` of ``n_steps`` steps from T
    down to ``t_eps``, or on an explicit decreasing sequence of times (then n_steps and t_eps are
    unused). R = prologue + n_steps * calls_per_step + denoise rows (a prologue row makes no model
    call: its time is NaN); W = 7 + 4 * history. Fresh copies of the cached Table's tensors
    (fastint.table.make_table returns the Table itself).
    """
    check_names(sde, method, grid)
    times = _grids.make(sde, grid, n_steps, t_eps) if isinstance(grid, str) else grid
    tab = make_table(sde, method, times, denoise=denoise, **options)
    return tab.coef.clone(), tab.times.clone()


# --------------------------------------------------------------------------- reference
def reference_grid(sde, grid, n_steps, t_eps=1e-3) -> torch.Tensor:
    """Times T = t_0 > ... > t_N = t_eps of a named grid (fastint.grids.make)."""
    return _grids.make(sde, grid, n_steps, t_eps)


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


def _interp_var(sde, interp):
    """conj_ms's interpolation variable as a function of t (None: t itself): log r, r, r/(1 + r) or its square."""
    if interp == 0.0:
        return None
    lr = _log_nsr(sde)
    if interp == 1.0:
        return lr
    if interp == 2.0:
        return lambda u: torch.exp(lr(u))
    if interp == 3.0:
        return lambda u: torch.sigmoid(lr(u))  # r/(1 + r)
    return lambda u: torch.sigmoid(lr(u)) ** 2


def _reference_conj_ms_x0(sde, tg, k, interp, lower, denoise, info, epsrel):
    """conj_ms predict='x0' on VP (no corrector): P = σ'/σ, Q_j = σ' ∫_{t'}^{t} α_u β_u ℓ_j(u) / (2σ_u³) du
    (the data-prediction exponential integrator), by scipy quad; the denoising row is z' = x̂0."""
    from scipy.integrate import quad

    var = _interp_var(sde, interp)
    t, t1 = tg[:-1], tg[1:]
    N = t.numel()
    table = torch.zeros(N + int(denoise), 7 + 4 * info.history, dtype=_F64)
    for n in range(N):
        kk = min(k, n + 1, N + int(denoise) - n) if lower else min(k, n + 1)
        nodes = [float(tg[n - m]) for m in range(kk)]
        s1 = float(sde.sigma(t1[n:n + 1]))
        table[n, 0] = s1 / float(sde.sigma(t[n:n + 1]))
        for j in range(kk):
            lj = _lagrange(nodes, j, var)

            def f(u):
                uu = torch.tensor([u], dtype=_F64)
                return float(sde.alpha(uu) * sde.beta(uu) * lj(uu) / (2 * sde.sigma(uu) ** 3))
            table[n, 7 + 4 * j] = s1 * quad(f, float(t1[n]), float(t[n]), epsabs=0, epsrel=epsrel, limit=200)[0]
    times = t
    if denoise:
        table[N, 7] = 1.0
        times = torch.cat([t, tg[-1:]])
    return table, times


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
        _, _, (k, corr, interp, lower, predict) = _check_args(sde, method, grid, n_steps, t_eps, denoise, options)
        if predict == 1.0:
            return _reference_conj_ms_x0(sde, tg, int(k), interp, lower == 1.0, denoise, info, epsrel)
        var = _interp_var(sde, interp)
        P = sde.transition(t1, t)
        Q = torch.zeros(N, info.history, d, d, dtype=_F64)
        rows_left = N + int(denoise)
        for n in range(N):  # lower_final: no more points than rows left, the denoising row included
            kk = min(int(k), n + 1, rows_left - n) if lower == 1.0 else min(int(k), n + 1)
            nodes = [float(tg[n - m]) for m in range(kk)]
            for j in range(len(nodes)):
                Q[n, j] = _ddim_Q(sde, t[n:n + 1], t1[n:n + 1], epsrel, weight=_lagrange(nodes, j, var))[0]
        Qp = Q.clone()
        for n in range(N):  # step n's correction, carried by row n + 1 or the denoising row (integrators.md §3)
            cnt = min(int(k) + 1, n + 2) if corr >= 2.0 else (2 if corr == 1.0 and n == 0 and k >= 2 else 0)
            if cnt == 0:
                continue
            nodes = [float(tg[n + 1 - m]) for m in range(cnt)]
            D = torch.zeros(info.history, d, d, dtype=_F64)
            for j in range(cnt):
                D[j] = _ddim_Q(sde, t[n:n + 1], t1[n:n + 1], epsrel, weight=_lagrange(nodes, j, var))[0]
            D[1:] -= Qp[n, :-1]  # (Qp[n] is zero past the predictor's own points)
            if n + 1 < N:
                Q[n + 1] += P[n + 1] @ D
            elif corr != 3.0:  # 'inner': the last correction is not carried into the denoising row
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
