"""k-diffusion-style sampling functions backed by fastint's tables and fused step.

Drop-in for ``k_diffusion.sampling.sample_*``::

    from fastint.k_diffusion import sample_lambda_ddim
    x0 = sample_lambda_ddim(model, x, sigmas, extra_args={"cond": c}, disable=False)

Convention (k-diffusion's): ``model(x, sigma * s_in, **extra_args)`` returns the denoised x0,
with x = x0 + σ ε (variance exploding); ``sigmas`` is decreasing and usually ends at 0; ``x``
starts as ``noise * sigmas[0]``. Each σ_i is a knot of a discrete VP schedule with
ᾱ = 1/(1 + σ_i²) at fastint time t = (K − i)/K (K positive sigmas, uniform in the step index),
and the rows of the VP table are rescaled by α to act on the VE state directly. ``sample_ddim``
is exactly k-diffusion's ``sample_euler`` (Euler in σ); the last step to σ = 0 returns the
denoised output. Details: docs/dropin.md.
"""
from __future__ import annotations

import math
import numbers

import torch

from .coefficients import METHODS, build_table
from .ops import step as fused_step
from .processes import VPSDE
from .tuning import tuned_lambda

__all__ = ["sample_ddim", "sample_lambda_ddim", "sample_conj_ms", "sample_sddim", "ve_table"]

_F64 = torch.float64


def _trange(n, disable):
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional: no bar, same result
        return range(n)
    return trange(n, disable=disable)


def _check_sigmas(sigmas):
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().to("cpu", _F64)  # one host read, before the loop
    if not torch.isfinite(s).all():
        raise ValueError("sigmas must be finite")
    if (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError("sigmas must be positive, except a final 0")
    if (s[1:] >= s[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing")
    return s


def ve_table(sigmas, method, **options):
    """float64 table [len(sigmas) - 1, W] of ``method`` acting on the VE state x = x0 + σ ε.

    Rows: x_{i+1} = P x_i + Σ_j Q_j ε_{i−j} + S ξ with ε_i = (x_i − D(x_i; σ_i))/σ_i.
    """
    s = _check_sigmas(sigmas) if isinstance(sigmas, torch.Tensor) else _check_sigmas(torch.as_tensor(sigmas))
    zero_end = bool(s[-1] == 0)
    pos = s[:-1] if zero_end else s
    K = pos.numel()
    info = METHODS[method]
    alpha = 1.0 / torch.sqrt(1.0 + pos**2)  # VP α at each sigma
    if K == 1:  # [σ0, 0]: the single Tweedie step x0 = x − σ0 ε
        table = torch.zeros(1, 7 + 4 * info.history, dtype=_F64)
        table[0, 0], table[0, 7] = 1.0, -float(pos[0])
        return table
    sde = VPSDE(alphas_cumprod=(alpha**2).flip(0), T=1.0)  # knot i (t = i/K) holds σ_{K−i}
    table, _ = build_table(sde, method, "uniform", K - 1, t_eps=1.0 / K, denoise=zero_end, **options)
    a_next = torch.cat([alpha[1:], torch.ones(1, dtype=_F64)]) if zero_end else alpha[1:]
    table = table.clone()
    table[:, 0] *= alpha / a_next  # P: z = α x on both sides
    table[:, 4] /= a_next  # S
    table[:, 7::4] /= a_next[:, None]  # Q_j (x-x entries; VP uses only those)
    return table


def _run(method, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, **options):
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise TypeError("x must be a torch.Tensor batch [B, C, ...]")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    extra_args = {} if extra_args is None else extra_args
    table = ve_table(sigmas, method, **options)
    info = METHODS[method]
    coef = table.to(device=x.device, dtype=torch.float32).contiguous()
    sig64 = _check_sigmas(sigmas)
    inv_sigma = (1.0 / sig64[: table.shape[0]]).to(device=x.device, dtype=torch.float32)
    sigmas = sigmas.to(x.device)
    s_in = x.new_ones([x.shape[0]])
    if info.stochastic and noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731  (k-diffusion's default)
    hist = []
    for i in _trange(table.shape[0], disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = ((x - denoised) * inv_sigma[i]).to(x.dtype)
        hist = [eps] + hist[: info.history - 1]
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if info.stochastic else None
        x = fused_step(x, hist, coef, i, 1, noise=noise)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM (fastint's ``ddim``): in σ it is Euler, i.e. k-diffusion's ``sample_euler`` without churn."""
    return _run("ddim", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_lambda_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, lam=None):
    """fastint's ``lambda_ddim`` (B = lam·I in the step-index time t ∈ (0, 1]); ``lam=0`` is DDIM.
    ``lam=None`` takes the value tuned for VP at this number of steps (fastint.tuning)."""
    if lam is None:
        lam = tuned_lambda(VPSDE(), max(1, len(sigmas) - 1), b="identity")[0]
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite float, got {lam!r}")
    return _run("lambda_ddim", model, x, sigmas, extra_args, callback, disable, lam=float(lam), b="identity")


@torch.no_grad()
def sample_conj_ms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, corrector="none",
                   interp="t"):
    """fastint's ``conj_ms`` (exponential multistep, ε Lagrange-interpolated through the last
    ``order`` outputs). Defaults: in the step index (DEIS tAB), lower order on the first steps.
    ``interp="logsnr"`` interpolates in log σ instead, and ``corrector="every"`` (order <= 2)
    adds the Adams–Moulton correction carried by the next step (order + 1, no extra call):
    ``order=2, corrector="every", interp="logsnr"`` is third order and the most accurate from
    about 20 steps on; below that ``order=3, interp="logsnr"`` measured best (docs/dropin.md)."""
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    return _run("conj_ms", model, x, sigmas, extra_args, callback, disable, k=order, corrector=corrector,
                interp=interp)


@torch.no_grad()
def sample_sddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, noise_sampler=None):
    """Stochastic DDIM (fastint's ``sddim``): eta = 0 is DDIM, eta = 1 ancestral sampling.
    ``noise_sampler(sigma, sigma_next)`` returns standard normals like x (default: randn_like)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
    return _run("sddim", model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, eta=float(eta))
