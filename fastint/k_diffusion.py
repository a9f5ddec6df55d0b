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
import sys

import torch

from .processes import VPSDE
from .table import check_finite, make_table, run, table_dtype
from .tuning import tuned_lambda_on_knots

__all__ = ["sample_ddim", "sample_lambda_ddim", "sample_conj_ms", "sample_sddim", "ve_table"]

_F64 = torch.float64


def _show_progress(disable):
    """k-diffusion's ``disable``: True hides the bar, None shows it on a terminal (as tqdm does)."""
    return disable is False or (disable is None and sys.stderr.isatty())


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
    pos = s[s > 0]
    if float(pos.min()) < 2.0**-24 or float(pos.max()) > 2.0**24:  # float32: x = x0 + σε resolves both terms
        raise ValueError(f"sigmas must lie in [2^-24, 2^24] (except a final 0), got values in "
                         f"[{float(pos.min()):.3g}, {float(pos.max()):.3g}]")
    return s


def ve_table(sigmas, method, **options):
    """The Table (fastint.table) of ``method`` acting on the VE state x = x0 + σ ε, one row per
    positive sigma but the last (and the denoising row when sigmas end at 0).

    Rows: x_{i+1} = P x_i + Σ_j Q_j ε_{i−j} + S ξ with ε_i = (x_i − D(x_i; σ_i))/σ_i. The K
    positive sigmas are the knots of a discrete VP schedule (ᾱ = 1/(1 + σ²)) at times
    t = (K − i)/K, and the VP rows are rescaled by α to act on the VE state.
    """
    s = _check_sigmas(sigmas) if isinstance(sigmas, torch.Tensor) else _check_sigmas(torch.as_tensor(sigmas))
    zero_end = bool(s[-1] == 0)
    pos = s[:-1] if zero_end else s
    K = pos.numel()
    alpha = 1.0 / torch.sqrt(1.0 + pos**2)  # VP α at each sigma
    sde = VPSDE(alphas_cumprod=(alpha**2).flip(0), T=1.0)  # knot i (t = i/K) holds σ_{K−i}
    times = (K - torch.arange(K, dtype=_F64)) / K
    tab = make_table(sde, method, times, denoise=zero_end, **options)
    a_next = torch.cat([alpha[1:], torch.ones(1, dtype=_F64)]) if zero_end else alpha[1:]
    coef = tab.coef.clone()
    coef[:, 0] *= alpha[: len(a_next)] / a_next  # P: z = α x on both sides
    coef[:, 4] /= a_next  # S
    coef[:, 7::4] /= a_next[:, None]  # Q_j (x-x entries; VP uses only those)
    conv = None
    if tab.history_conv is not None:  # x̂0 = x − σ ε on the VE state
        conv = torch.stack([torch.ones(len(tab), dtype=_F64), -pos[: len(tab)]], 1)
    return type(tab)(coef, tab.times, 1, tab.method, tab.options, conv)


def _run(method, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, s_noise=1.0, **options):
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise TypeError("x must be a torch.Tensor batch [B, C, ...] (or [B] of scalars)")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(dict) or None, got {type(callback).__name__}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    if x.ndim == 1:  # a batch of scalars: the op works on [B, 1]; model, callback and noise see [B]
        inner, user_cb = model, callback
        model = lambda v, sigma, **kw: inner(v[:, 0], sigma, **kw)[:, None]  # noqa: E731
        if user_cb is not None:
            callback = lambda d: user_cb({k: v[:, 0] if k in ("x", "denoised") else v for k, v in d.items()})  # noqa: E731
        if noise_sampler is not None:
            inner_noise = noise_sampler
            noise_sampler = lambda s, s1: inner_noise(s, s1)[:, None]  # noqa: E731
        return _run(method, model, x[:, None], sigmas, extra_args, callback, disable, noise_sampler, s_noise,
                    **options)[:, 0]
    extra_args = {} if extra_args is None else extra_args
    cdt = table_dtype(x.dtype)
    table = ve_table(sigmas, method, **options).to(x.device, cdt)
    sig64 = _check_sigmas(sigmas)
    inv_sigma = (1.0 / sig64[: len(table.calls)]).to(device=x.device, dtype=cdt)
    sigmas = sigmas.to(x.device)
    s_in = x.new_ones([x.shape[0]])
    stochastic = table.table.info.stochastic
    if stochastic and noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731  (k-diffusion's default)

    def eps_of(x, i):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape:  # no silent broadcast
            got = tuple(denoised.shape) if isinstance(denoised, torch.Tensor) else type(denoised).__name__
            raise ValueError(f"model output (the denoised x) must have x's shape {tuple(x.shape)}, got {got}")
        if not denoised.is_floating_point():
            raise TypeError(f"model output must be a floating-point tensor, got {denoised.dtype}")
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        return ((x - denoised) * inv_sigma[i]).to(x.dtype)

    # no noise (and no noise_sampler call) for a step to sigma 0, as k-diffusion: a host list, not a
    # branch on a tensor in the loop
    to_zero = (sig64[1:] == 0).tolist()

    def noise(i):
        if to_zero[i]:
            return None
        xi = noise_sampler(sigmas[i], sigmas[i + 1])
        return xi if s_noise == 1.0 else xi * s_noise

    noise_of = noise if stochastic else None
    # a callback sees every state: give each its own tensor (the callback may keep it)
    x = run(table, eps_of, x, noise_of, progress=_show_progress(disable), desc=f"fastint {method}",
            reuse=callback is None)
    return check_finite(x, f"fastint.k_diffusion sample_{method}")


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM (fastint's ``ddim``): in σ it is Euler, i.e. k-diffusion's ``sample_euler`` without churn."""
    return _run("ddim", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_lambda_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, lam=None):
    """fastint's ``lambda_ddim`` (B = lam·I in the step-index time t ∈ (0, 1]); ``lam=0`` is DDIM.
    ``lam=None`` takes the value tuned for VP at this number of steps on such knots
    (fastint.tuning.tuned_lambda_on_knots) where it holds: sigmas ending at 0 (the last step maps
    to x̂0) and at least 3 model calls; else 0, DDIM. Without the final 0 the tuned value ended a
    point mass 3.4 away after 2 steps (DDIM: exact), and with 2 calls on Karras sigmas from 80 its
    error was 13x DDIM's; with 3-8 calls it is 0.01-0.7x DDIM's (docs/dropin.md, section 2)."""
    if lam is None:
        zero_end = isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1 and bool(sigmas[-1] == 0)
        calls = len(sigmas) - 1 if zero_end else len(sigmas)
        lam = tuned_lambda_on_knots(calls) if zero_end and calls >= 3 else 0.0
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite float, got {lam!r}")
    return _run("lambda_ddim", model, x, sigmas, extra_args, callback, disable, lam=float(lam), b="identity")


@torch.no_grad()
def sample_conj_ms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, corrector="none",
                   interp="t", predict="eps"):
    """fastint's ``conj_ms`` (exponential multistep, ε Lagrange-interpolated through the last
    ``order`` outputs). Defaults: in the step index (DEIS tAB), lower order on the first steps.
    ``interp="logsnr"`` interpolates in log σ instead, and ``corrector="every"`` (order <= 2)
    adds the Adams–Moulton correction carried by the next step (order + 1, no extra call):
    ``order=2, corrector="every", interp="logsnr"`` is third order and the most accurate from
    about 20 steps on; below that ``order=3, interp="logsnr"`` measured best (docs/dropin.md).
    ``predict="x0"`` interpolates the denoised outputs instead of ε (DPM-Solver++'s frame)."""
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    return _run("conj_ms", model, x, sigmas, extra_args, callback, disable, k=order, corrector=corrector,
                interp=interp, predict=predict)


@torch.no_grad()
def sample_sddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                 noise_sampler=None):
    """Stochastic DDIM (fastint's ``sddim``): eta = 0 is DDIM, eta = 1 ancestral sampling, i.e.
    k-diffusion's ``sample_euler_ancestral`` with the same arguments: ``noise_sampler(sigma,
    sigma_next)`` returns standard normals like x (default: randn_like), scaled by ``s_noise``, and
    is called only for steps to a positive sigma (as k-diffusion's)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
    if isinstance(s_noise, bool) or not isinstance(s_noise, numbers.Real) or not (0.0 <= s_noise < math.inf):
        raise ValueError(f"s_noise must be a finite float >= 0, got {s_noise!r}")
    return _run("sddim", model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler,
                s_noise=float(s_noise), eta=float(eta))
