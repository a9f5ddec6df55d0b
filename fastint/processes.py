"""Linear diffusion processes (docs/design.md, "Processes") with float64 reference maths.

Every process here is a linear SDE  dz = F_t z dt + G_t dw  acting independently on
each pixel: on x alone for VP (``dim == 1``), on the pair (x, m) for the phase-space
processes PSLD and CLD (``dim == 2``). With a linear schedule
β(t) = β_min + (t/T)(β_max − β_min) and B(t) = ∫₀ᵗ β, both families are

    F_t = β(t) A,   G_t G_tᵀ = β(t) D,   with A = ½F̄ constant,

so everything depends on t only through B(t): the transition is Ψ(t, s) = exp((B(t) − B(s)) A)
and the noise covariance is K(b) = ∫₀ᵇ e^{rA} D e^{rAᵀ} dr at b = B(t) − B(s).
The derivations are in docs/integrators.md.

All maths is done in float64 torch tensors on the device of the time argument. Per-pixel
matrices have shape ``t.shape + (dim, dim)``; a time is a float or a tensor of any shape
(a scalar or one entry per batch element where it meets a state). State tensors are
``[B, dim*C, *S]`` with x the first C channels and m the last C.
"""
from __future__ import annotations

import math
import numbers

import torch

from .checks import is_int

__all__ = ["VPSDE", "PSLD", "CLD", "expm2", "lyapunov_integral"]

_F64 = torch.float64
PREDICTIONS_VP = ("eps", "score", "x0", "v")
PREDICTIONS_AUG = ("eps", "score")


# --------------------------------------------------------------------------- helpers
def _param(name, value, *, low=None, low_open=False):
    """A finite float parameter, optionally bounded below; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    return value


# What float32 sampling can represent (the tables and states are float32; u = 2^-24 its unit
# roundoff): x and m share one state, so their scales (1 and √M) and the initial momentum scale
# √(κM) must lie within a factor 2^24 of each other, or one sits below the other's rounding; and
# the inverse transition exp(−B(T) A) over [0, T], the factor 1/α_T that the first table rows and
# the x̂0 = (z − σε)/α conversion hold, must be a finite float32 (≤ 2^126; VP: ᾱ_T ≥ 2^-252).
_SCALE_RATIO = 2.0**24
_MAX_INV_TRANSITION = 2.0**126


def _bounded(name, value, low, high):
    """``value`` if it lies in [low, high], else ValueError naming the parameter and why."""
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low:.3g}, {high:.3g}] (scales within float32's 2^24 of each "
                         f"other), got {value:g}")
    return value


def expm2(M: torch.Tensor) -> torch.Tensor:
    """exp(M) of a batch of 2×2 matrices [..., 2, 2] in closed form (Cayley–Hamilton).

    With μ = tr(M)/2 and N = M − μI (traceless, so N² = δI with δ = n² + pq computed from
    N's entries without cancellation): exp(M) = e^μ (c(δ) I + s(δ) N), where
    c = cosh√δ, s = sinh√δ/√δ (cos, sin for δ < 0). Both are entire in δ, so the formula
    is exact at a repeated eigenvalue (δ = 0: c = s = 1) and continuous through it.
    """
    mu = 0.5 * (M[..., 0, 0] + M[..., 1, 1])
    n = 0.5 * (M[..., 0, 0] - M[..., 1, 1])
    p, q = M[..., 0, 1], M[..., 1, 0]
    delta = n * n + p * q
    y = delta.abs().sqrt()
    pos = delta >= 0
    c = torch.where(pos, torch.cosh(y), torch.cos(y))
    ysafe = torch.where(y > 0, y, torch.ones_like(y))
    s = torch.where(y > 0, torch.where(pos, torch.sinh(ysafe), torch.sin(ysafe)) / ysafe, torch.ones_like(y))
    e = torch.exp(mu)
    out = torch.empty(M.shape, dtype=M.dtype, device=M.device)
    out[..., 0, 0] = e * (c + s * n)
    out[..., 1, 1] = e * (c - s * n)
    out[..., 0, 1] = e * s * p
    out[..., 1, 0] = e * s * q
    return out


def lyapunov_integral(A: torch.Tensor, D: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """K(b) = ∫₀ᵇ e^{rA} D e^{rAᵀ} dr for 2×2 A, D and a tensor of b ≥ 0 → [..., 2, 2].

    Scaling and doubling, free of cancellation. (Solving AK + KAᵀ = e^{bA}De^{bAᵀ} − D instead
    has an O(1) − O(1) right side, which costs K_xx ~ b³ a relative error of ~1e-16/b² when
    Γ = 0.) K at b₀ = b/2^k comes from its Taylor series Σ b₀^{n+1}/(n+1)! Lⁿ(D), with
    L(X) = AX + XAᵀ and ‖L‖b₀ ≤ 1/2; then K(2b) = K(b) + e^{bA} K(b) e^{bAᵀ}, a sum of positive
    semidefinite terms, k times.
    """
    b = b.to(_F64)
    A = A.to(dtype=_F64, device=b.device)
    D = D.to(dtype=_F64, device=b.device)
    normL = 2.0 * float(A.abs().sum(-1).max())
    bmax = float(b.max()) if b.numel() else 0.0
    k = max(0, math.ceil(math.log2(bmax * normL / 0.5))) if bmax * normL > 0.5 else 0
    b0 = (b / 2.0**k)[..., None, None]
    term = b0 * D
    K = term.clone()
    for n in range(1, 20):  # (1/2)^n/(n+1)! < 1e-22 at n = 19
        term = (A @ term + term @ A.mT) * (b0 / (n + 1))
        K = K + term
    for j in range(k):
        E = expm2((b0 * 2.0**j) * A)
        K = K + E @ K @ E.mT
    return K


def _chol2(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of SPD 2×2 matrices [..., 2, 2]."""
    L = torch.zeros_like(S)
    l11 = S[..., 0, 0].sqrt()
    l21 = S[..., 1, 0] / l11
    L[..., 0, 0] = l11
    L[..., 1, 0] = l21
    L[..., 1, 1] = (S[..., 1, 1] - l21 * l21).sqrt()
    return L


def _inv_chol_T2(L: torch.Tensor) -> torch.Tensor:
    """L^{-T} = [[1/L11, −L21/(L11 L22)], [0, 1/L22]] for lower-triangular 2×2 L."""
    out = torch.zeros_like(L)
    out[..., 0, 0] = 1.0 / L[..., 0, 0]
    out[..., 1, 1] = 1.0 / L[..., 1, 1]
    out[..., 0, 1] = -L[..., 1, 0] / (L[..., 0, 0] * L[..., 1, 1])
    return out


def _per_unique(fn, b: torch.Tensor) -> torch.Tensor:
    """fn(b) [..., d, d], evaluated once per distinct value of b: a sampler passes one time
    expanded over the batch, and the matrix functions cost ~100 small ops each."""
    if b.numel() <= 1:
        return fn(b)
    vals, inv = torch.unique(b, return_inverse=True)
    return fn(vals)[inv]


# --------------------------------------------------------------------------- base class
class _LinearSDE:
    """Shared machinery: schedule, times, per-pixel matrix application, ε/score/drifts.

    Processes are immutable once built: coefficient tables are cached by their parameters, and
    the Python maths (ε conversions, Cholesky factors) is derived from them at construction, so
    a changed attribute would silently disagree with one or the other."""

    dim: int
    T: float
    beta_min: float
    beta_max: float

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable (its tables are cached by its parameters): "
                                 f"build a new process instead of setting {name!r}")
        object.__setattr__(self, name, value)

    def _check_representable(self, params):
        """ValueError naming ``params`` unless the inverse transition exp(−B(T) A) from T back to
        0 is finite in float32 (≤ 2^126): beyond, the tables overflow or lose all digits, and
        for VP the signal α_T = exp(−B(T)/2) at T is not a normal float32 number."""
        b = self._int_beta(torch.tensor(self.T, dtype=_F64))
        inv = float(self._expA(-b).abs().max()) if math.isfinite(float(b)) else math.inf
        if not inv <= _MAX_INV_TRANSITION:  # also NaN
            raise ValueError(f"{type(self).__name__}({self._repr_args()}): the process integrates to B(T) = "
                             f"{float(b):.4g}, and its inverse transition exp(-B(T) A) reaches {inv:.3g}, beyond "
                             f"float32 ({_MAX_INV_TRANSITION:.3g}): lower {params}")

    # ---- schedule -------------------------------------------------------------------
    def _time(self, t, *, name="t", allow_zero=False, device=None) -> torch.Tensor:
        """t as a float64 tensor on its own device, checked to lie in (0, T] (or [0, T])."""
        if isinstance(t, torch.Tensor):
            if t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be a real tensor, got {t.dtype}")
            tt = t.to(_F64)
        elif isinstance(t, numbers.Real) and not isinstance(t, bool):
            tt = torch.tensor(float(t), dtype=_F64, device=device)
        else:
            raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
        if tt.numel():
            lo, hi = float(tt.min()), float(tt.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} must be finite")
            ok_lo = lo >= 0.0 if allow_zero else lo > 0.0
            if not ok_lo or hi > self.T:
                rng = "[0, T]" if allow_zero else "(0, T]"
                raise ValueError(f"{name} must lie in {rng} with T = {self.T}, got values in [{lo}, {hi}]")
        return tt

    def _time_pair(self, t, s, *, allow_zero):
        """Two times on one device (that of whichever is a tensor)."""
        dev = t.device if isinstance(t, torch.Tensor) else (s.device if isinstance(s, torch.Tensor) else None)
        return self._time(t, allow_zero=allow_zero, device=dev), self._time(s, name="s", allow_zero=True, device=dev)

    def beta(self, t) -> torch.Tensor:
        """β(t); with a discrete schedule, the constant rate of the knot interval (t_{i−1}, t_i] holding t."""
        t = self._time(t, allow_zero=True)
        if self._knots is None:
            return self.beta_min + (t / self.T) * (self.beta_max - self.beta_min)
        kt, kB = (k.to(t.device) for k in self._knots)
        i = torch.searchsorted(kt, t).clamp(1, kt.numel() - 1)
        return (kB[i] - kB[i - 1]) / (kt[i] - kt[i - 1])

    def int_beta(self, t) -> torch.Tensor:
        """B(t) = ∫₀ᵗ β(u) du (piecewise linear between knots for a discrete schedule)."""
        t = self._time(t, allow_zero=True)
        return self._int_beta(t)

    def _int_beta(self, t):
        if self._knots is None:
            return t * (self.beta_min + 0.5 * (t / self.T) * (self.beta_max - self.beta_min))
        kt, kB = (k.to(t.device) for k in self._knots)
        i = torch.searchsorted(kt, t).clamp(1, kt.numel() - 1)
        w = (t - kt[i - 1]) / (kt[i] - kt[i - 1])
        return kB[i - 1] + w * (kB[i] - kB[i - 1])

    def inv_int_beta(self, b) -> torch.Tensor:
        """The t with B(t) = b, for b in [0, B(T)] (stable root of the quadratic, or knot interpolation)."""
        b = torch.as_tensor(b, dtype=_F64)
        if self._knots is None:
            c = (self.beta_max - self.beta_min) / self.T
            return 2.0 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * c * b))
        kt, kB = (k.to(b.device) for k in self._knots)
        i = torch.searchsorted(kB, b).clamp(1, kB.numel() - 1)
        w = (b - kB[i - 1]) / (kB[i] - kB[i - 1])
        return kt[i - 1] + w * (kt[i] - kt[i - 1])

    # ---- per-pixel matrices -----------------------------------------------------------
    def drift_matrix(self, t) -> torch.Tensor:
        """F_t = β(t) A, [..., dim, dim]."""
        beta = self.beta(t)
        return beta[..., None, None] * self._A.to(beta.device)

    def diffusion_matrix(self, t) -> torch.Tensor:
        """G_t G_tᵀ = β(t) D, [..., dim, dim]."""
        beta = self.beta(t)
        return beta[..., None, None] * self._D.to(beta.device)

    def transition(self, t, s=0.0) -> torch.Tensor:
        """Ψ(t, s) = exp((B(t) − B(s)) A): the mean map from time s to time t, [..., dim, dim]."""
        t, s = self._time_pair(t, s, allow_zero=True)
        return _per_unique(self._expA, self._int_beta(t) - self._int_beta(s))

    def marginal_cov(self, t, sigma0=None, jitter=False) -> torch.Tensor:
        """Σ_t = Ψ(t,0) Σ₀ Ψ(t,0)ᵀ + ∫₀ᵗ β(u) Ψ(t,u) D Ψ(t,u)ᵀ du, [..., dim, dim].

        sigma0 is Σ₀ ([dim, dim] or broadcastable against t.shape + (dim, dim)); None means the
        training convention ``self.sigma0``. jitter=True adds ``self.jitter`` to the diagonal,
        giving the covariance whose Cholesky factor defines ε.
        """
        t = self._time(t, allow_zero=True)
        sigma0 = self.sigma0 if sigma0 is None else sigma0
        sigma0 = torch.as_tensor(sigma0, dtype=_F64, device=t.device)
        if sigma0.shape[-2:] != (self.dim, self.dim):
            raise ValueError(f"sigma0 must have shape [..., {self.dim}, {self.dim}], got {tuple(sigma0.shape)}")
        b = self._int_beta(t)
        E = _per_unique(self._expA, b)
        S = E @ sigma0 @ E.mT + _per_unique(self._noise_cov, b)
        if jitter and self.jitter:
            S = S + self.jitter * torch.eye(self.dim, dtype=_F64, device=t.device)
        return S

    def cholesky(self, t) -> torch.Tensor:
        """L_t, lower Cholesky factor of the ε-convention covariance marginal_cov(t, jitter=True)."""
        S = self.marginal_cov(self._time(t), jitter=True)
        return S.sqrt() if self.dim == 1 else _chol2(S)

    def inv_chol_T(self, t) -> torch.Tensor:
        """L_t^{−T} (upper triangular): the score is s = −L_t^{−T} ε."""
        L = self.cholesky(t)
        return 1.0 / L if self.dim == 1 else _inv_chol_T2(L)

    def prior_cov(self) -> torch.Tensor:
        """Covariance of the prior at T (the stationary law): VP 1, phase space diag(1, M)."""
        return self._prior_cov.clone()

    @property
    def Fbar(self) -> torch.Tensor:
        """F̄ with F_t = ½β(t) F̄: VP [[−1]], phase space [[−Γ, M⁻¹], [−1, −ν]]."""
        return 2.0 * self._A

    @property
    def D(self) -> torch.Tensor:
        """D with G_t G_tᵀ = β(t) D: VP [[1]], phase space diag(Γ, Mν)."""
        return self._D.clone()

    # ---- state tensors ----------------------------------------------------------------
    def _check_state(self, z, name="z"):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
        if z.ndim < 2:
            raise ValueError(f"{name} must have shape [B, C, ...] (ndim >= 2), got {tuple(z.shape)}")
        if self.dim == 2 and z.shape[1] % 2:
            raise ValueError(
                f"{name} must have an even channel count [B, 2C, ...] (x then m) for {type(self).__name__}, "
                f"got {z.shape[1]} channels"
            )

    def apply(self, M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Apply per-pixel matrices M ([dim, dim] or [B, dim, dim]) to a state z [B, dim*C, ...].

        Computed in float64 (the reference), returned in z's dtype.
        """
        self._check_state(z)
        M = M.to(device=z.device, dtype=_F64)
        if M.ndim == 3 and M.shape[0] not in (1, z.shape[0]):
            raise ValueError(f"per-sample matrices have batch {M.shape[0]}, but z has batch {z.shape[0]}")
        M = M.reshape(M.shape[:-2] + (1,) * (z.ndim - 1) + M.shape[-2:]) if M.ndim == 3 else M
        zz = z.to(_F64)
        if self.dim == 1:
            return (M[..., 0, 0] * zz).to(z.dtype)
        x, m = zz.chunk(2, dim=1)
        out = torch.cat([M[..., 0, 0] * x + M[..., 0, 1] * m, M[..., 1, 0] * x + M[..., 1, 1] * m], dim=1)
        return out.to(z.dtype)

    def _per_sample(self, t, z, name="z"):
        """Time checked against the state: a scalar or a 1-D tensor with one entry per batch element."""
        self._check_state(z, name)
        t = self._time(t, device=z.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, z.shape[0])):
            raise ValueError(f"t must be a scalar or have shape [{z.shape[0]}] (one per batch element), "
                             f"got shape {tuple(t.shape)}")
        return t

    def data_part(self, z) -> torch.Tensor:
        """x of a state: the first C channels of [B, 2C, ...] (a view), or z itself for VP."""
        self._check_state(z)
        return z if self.dim == 1 else z[:, : z.shape[1] // 2]

    def marginal_mean(self, z0, t) -> torch.Tensor:
        """μ_t = Ψ(t, 0) z₀ for a full initial state z₀ (phase space: m₀ included)."""
        t = self._per_sample(t, z0)
        return self.apply(self.transition(t, 0.0), z0)

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """A draw from the prior at T. shape is the DATA shape [B, C, ...]; phase-space processes
        return the full state [B, 2C, ...] with x ~ N(0, I) and m ~ N(0, M I)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be a data shape [B, C, ...] with positive sizes, got {shape}")
        if generator is not None and device is None:
            device = generator.device
        full = (shape[0], self.dim * shape[1]) + shape[2:]
        z = torch.randn(full, generator=generator, dtype=dtype, device=device)
        if self.dim == 2:
            z[:, shape[1]:] *= math.sqrt(self.M)
        return z

    # ---- ε convention -------------------------------------------------------------------
    def eps_to_score(self, eps, t) -> torch.Tensor:
        """s = −L_t^{−T} ε."""
        t = self._per_sample(t, eps, "eps")
        return -self.apply(self.inv_chol_T(t), eps)

    def score_to_eps(self, score, t) -> torch.Tensor:
        """ε = −L_tᵀ s."""
        t = self._per_sample(t, score, "score")
        return -self.apply(self.cholesky(t).mT, score)

    def to_eps(self, output, z, t, prediction="eps") -> torch.Tensor:
        """Convert a model output of the given prediction type to ε."""
        allowed = PREDICTIONS_VP if self.dim == 1 else PREDICTIONS_AUG
        if prediction not in allowed:
            raise ValueError(f"prediction must be one of {allowed} for {type(self).__name__}, got {prediction!r}")
        self._check_state(output, "output")
        if output.shape != z.shape:
            raise ValueError(f"model output must have the state's shape {tuple(z.shape)}, got {tuple(output.shape)}")
        if prediction == "eps":
            return output
        if prediction == "score":
            return self.score_to_eps(output, t)
        if prediction == "x0":
            return self.x0_to_eps(output, z, t)
        return self.v_to_eps(output, z, t)

    def pf_ode_drift(self, z, t, eps) -> torch.Tensor:
        """dz/dt of the probability-flow ODE: F_t z + ½ G Gᵀ L^{−T} ε."""
        t = self._per_sample(t, z)
        score_part = 0.5 * self.diffusion_matrix(t) @ self.inv_chol_T(t)
        return self.apply(self.drift_matrix(t), z) + self.apply(score_part, eps)

    def reverse_sde_drift(self, z, t, eps) -> torch.Tensor:
        """Drift of the reverse SDE dz = [F_t z + G Gᵀ L^{−T} ε] dt + G dw̄ (integrated from T down to 0)."""
        t = self._per_sample(t, z)
        return self.apply(self.drift_matrix(t), z) + self.apply(self.diffusion_matrix(t) @ self.inv_chol_T(t), eps)

    # ---- for the C++ coefficient op -----------------------------------------------------
    @property
    def process_tensor(self) -> torch.Tensor:
        """float64 [kind, β_min, β_max, Γ, ν, M⁻¹, κ, jitter] for torch.ops.fastint.coefficients
        (kind 0 = VP, 1 = phase space; layout read by csrc/coefficients.cpp)."""
        kind = 0.0 if self.dim == 1 else 1.0
        g, nu, minv, kappa = (0.0, 0.0, 0.0, 0.0) if self.dim == 1 else (self.gamma, self.nu, self.m_inv, self.kappa)
        return torch.tensor([kind, self.beta_min, self.beta_max, g, nu, minv, kappa, self.jitter], dtype=_F64)

    @property
    def knots(self) -> torch.Tensor:
        """float64 [K, 2] rows (t_i, B(t_i)) of a discrete schedule, or [0, 2] for the linear β."""
        if self._knots is None:
            return torch.zeros(0, 2, dtype=_F64)
        return torch.stack(self._knots, dim=1).contiguous()

    def cache_key(self):
        """Hashable identity of the process (for the coefficient-table cache)."""
        return (type(self).__name__, self.T, tuple(self.process_tensor.tolist()), tuple(self.knots.flatten().tolist()))

    def __repr__(self):
        return f"{type(self).__name__}({self._repr_args()})"


# --------------------------------------------------------------------------- VP
class VPSDE(_LinearSDE):
    """Variance-preserving SDE dx = −½β x dt + √β dw: x_t = α_t x₀ + σ_t ε with α_t = e^{−B/2},
    σ_t = √(1 − α_t²).

    With ``alphas_cumprod`` (ᾱ_1 > ... > ᾱ_N, a discrete DDPM schedule) the process has knots
    t_i = iT/N with B(t_i) = −log ᾱ_i (ᾱ_0 = 1) and B piecewise linear between them, so
    α_{t_i}² = ᾱ_i exactly; β_min/β_max are then ignored.

    The schedule must keep 1/α_T a finite float32: B(T) <= 252 ln 2, i.e. ᾱ_T >= 2^-252.
    """

    dim = 1

    def __init__(self, beta_min=0.1, beta_max=20.0, T=1.0, alphas_cumprod=None):
        self.T = _param("T", T, low=0.0, low_open=True)
        self.jitter = 0.0
        self._A = torch.tensor([[-0.5]], dtype=_F64)
        self._D = torch.tensor([[1.0]], dtype=_F64)
        self.sigma0 = torch.zeros(1, 1, dtype=_F64)
        self._prior_cov = torch.ones(1, 1, dtype=_F64)
        if alphas_cumprod is None:
            self.beta_min = _param("beta_min", beta_min, low=0.0)
            self.beta_max = _param("beta_max", beta_max, low=0.0)
            if self.beta_min + self.beta_max <= 0:
                raise ValueError("beta_min and beta_max must not both be 0")
            self._knots = None
            self.alphas_cumprod = None
        else:
            ac = torch.as_tensor(alphas_cumprod, dtype=_F64).detach().cpu()
            if ac.ndim != 1 or ac.numel() < 1:
                raise ValueError(f"alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(ac.shape)}")
            if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac >= 1).any():
                raise ValueError("alphas_cumprod must be finite and lie in (0, 1)")
            if ac.numel() > 1 and (ac[1:] >= ac[:-1]).any():
                raise ValueError("alphas_cumprod must be strictly decreasing")
            n = ac.numel()
            kt = torch.arange(n + 1, dtype=_F64) * (self.T / n)
            kt[-1] = self.T
            kB = torch.cat([torch.zeros(1, dtype=_F64), -torch.log(ac)])
            self._knots = (kt, kB)
            self.alphas_cumprod = ac
            # The effective rates at both ends, for the record (β is piecewise constant here).
            self.beta_min = float((kB[1] - kB[0]) / (kt[1] - kt[0]))
            self.beta_max = float((kB[-1] - kB[-2]) / (kt[-1] - kt[-2]))
        self._check_representable("beta_max or T" if alphas_cumprod is None else
                                  f"the noise of the last step (alphas_cumprod[-1] = {float(self.alphas_cumprod[-1]):.3g} "
                                  "must be >= 2^-252)")
        self._frozen = True

    @classmethod
    def ddpm(cls, n=1000, beta_start=1e-4, beta_end=0.02, T=1.0):
        """The discrete DDPM schedule: linear β_i from beta_start to beta_end, ᾱ_i = Π(1 − β_j)."""
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        bs = _param("beta_start", beta_start, low=0.0, low_open=True)
        be = _param("beta_end", beta_end, low=0.0, low_open=True)
        if bs >= 1 or be >= 1:
            raise ValueError(f"beta_start and beta_end must be < 1, got {bs}, {be}")
        betas = torch.linspace(bs, be, int(n), dtype=_F64)
        ac = torch.cumprod(1.0 - betas, 0)
        if not float(ac[-1]) >= 2.0**-252:  # named here: the user passed betas, not alphas_cumprod
            raise ValueError(f"n={n}, beta_start={bs:g} and beta_end={be:g} give alphas_cumprod[-1] = "
                             f"{float(ac[-1]):.3g}, below 2^-252 (1/α_T beyond float32): lower beta_end or n")
        return cls(alphas_cumprod=ac, T=T)

    def _expA(self, b):
        return torch.exp(-0.5 * b)[..., None, None]

    def _noise_cov(self, b):
        return (-torch.expm1(-b))[..., None, None]

    def alpha(self, t) -> torch.Tensor:
        """α_t = exp(−B(t)/2)."""
        return torch.exp(-0.5 * self.int_beta(t))

    def sigma(self, t) -> torch.Tensor:
        """σ_t = √(1 − α_t²), computed as √(−expm1(−B)) to keep digits at small t."""
        return torch.sqrt(-torch.expm1(-self.int_beta(t)))

    def log_snr(self, t) -> torch.Tensor:
        """λ_t = log(α_t/σ_t)."""
        b = self.int_beta(t)
        return -0.5 * b - 0.5 * torch.log(-torch.expm1(-b))

    def _ab(self, t, z):
        t = self._per_sample(t, z)
        shape = (-1,) + (1,) * (z.ndim - 1) if t.ndim else ()
        return self.alpha(t).reshape(shape), self.sigma(t).reshape(shape)

    def eps_to_x0(self, eps, z, t) -> torch.Tensor:
        """x̂₀ = (z − σ ε)/α."""
        a, s = self._ab(t, z)
        return ((z.to(_F64) - s * eps.to(_F64)) / a).to(z.dtype)

    def x0_to_eps(self, x0, z, t) -> torch.Tensor:
        """ε = (z − α x̂₀)/σ."""
        a, s = self._ab(t, z)
        return ((z.to(_F64) - a * x0.to(_F64)) / s).to(z.dtype)

    def v_to_eps(self, v, z, t) -> torch.Tensor:
        """ε = α v + σ z, for v = α ε − σ x₀."""
        a, s = self._ab(t, z)
        return (a * v.to(_F64) + s * z.to(_F64)).to(z.dtype)

    def _repr_args(self):
        if self.alphas_cumprod is not None:
            return f"alphas_cumprod=<{self.alphas_cumprod.numel()} steps>, T={self.T}"
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T}"


# --------------------------------------------------------------------------- phase space
class PSLD(_LinearSDE):
    """Phase Space Langevin Diffusion on z = (x, m):
    F_t = ½β(t) F̄, F̄ = [[−Γ, M⁻¹], [−1, −ν]],  G Gᵀ = β(t) diag(Γ, Mν).

    Critical damping is M⁻¹ = ((ν − Γ)/2)²; any Γ ≥ 0, ν > 0, M⁻¹ in [2^-48, 2^48] is supported
    while exp(−B(T) A) stays within float32 (see _check_representable), with κ <= 2^48.
    The ε convention uses Σ₀ = diag(0, κM) and adds ``jitter`` (< min(1, M)) to Σ_xx and Σ_mm.
    """

    dim = 2

    def __init__(self, gamma=0.01, nu=4.01, m_inv=4.0, beta_min=8.0, beta_max=8.0, kappa=0.04, T=1.0, jitter=1e-9):
        self.gamma = _param("gamma", gamma, low=0.0)
        self.nu = _param("nu", nu, low=0.0, low_open=True)
        self.m_inv = _bounded("m_inv", _param("m_inv", m_inv, low=0.0, low_open=True), _SCALE_RATIO**-2,
                              _SCALE_RATIO**2)
        self.beta_min = _param("beta_min", beta_min, low=0.0)
        self.beta_max = _param("beta_max", beta_max, low=0.0)
        if self.beta_min + self.beta_max <= 0:
            raise ValueError("beta_min and beta_max must not both be 0")
        self.kappa = _bounded("kappa", _param("kappa", kappa, low=0.0), 0.0, _SCALE_RATIO**2)
        self.T = _param("T", T, low=0.0, low_open=True)
        self.jitter = _param("jitter", jitter, low=0.0)
        if self.jitter == 0.0 and self.gamma == 0.0 and self.kappa == 0.0:
            raise ValueError("jitter must be > 0 when gamma == 0 and kappa == 0 (Σ_t is singular as t -> 0)")
        self.M = 1.0 / self.m_inv
        if self.jitter >= min(1.0, self.M):
            raise ValueError(f"jitter must be < min(1, M) = {min(1.0, self.M):g}, the stationary variances of x and m "
                             f"(it regularises Σ_t near t = 0, it must not replace it), got {self.jitter:g}")
        self._knots = None
        Fbar = torch.tensor([[-self.gamma, self.m_inv], [-1.0, -self.nu]], dtype=_F64)
        self._A = 0.5 * Fbar
        self._D = torch.diag(torch.tensor([self.gamma, self.M * self.nu], dtype=_F64))
        self.sigma0 = torch.diag(torch.tensor([0.0, self.kappa * self.M], dtype=_F64))
        self._prior_cov = torch.diag(torch.tensor([1.0, self.M], dtype=_F64))
        self._check_representable("beta_max, T, gamma or nu")
        self._frozen = True

    def _expA(self, b):
        return expm2(b[..., None, None] * self._A.to(b.device))

    def _noise_cov(self, b):
        return lyapunov_integral(self._A, self._D, b)

    def _repr_args(self):
        return (
            f"gamma={self.gamma}, nu={self.nu}, m_inv={self.m_inv}, beta_min={self.beta_min}, "
            f"beta_max={self.beta_max}, kappa={self.kappa}, T={self.T}, jitter={self.jitter}"
        )


class CLD(PSLD):
    """Critically damped Langevin diffusion (Dockhorn et al.): PSLD with Γ = 0, no noise on x.

    Preset ν = 4, M⁻¹ = 4, β = 8, κ = 0.04 (CLD-SGM's β = 4, Γ = 1 in their drift convention).
    """

    def __init__(self, nu=4.0, m_inv=4.0, beta_min=8.0, beta_max=8.0, kappa=0.04, T=1.0, jitter=1e-9):
        super().__init__(gamma=0.0, nu=nu, m_inv=m_inv, beta_min=beta_min, beta_max=beta_max,
                         kappa=kappa, T=T, jitter=jitter)

    def _repr_args(self):
        return (f"nu={self.nu}, m_inv={self.m_inv}, beta_min={self.beta_min}, beta_max={self.beta_max}, "
                f"kappa={self.kappa}, T={self.T}, jitter={self.jitter}")
