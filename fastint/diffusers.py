"""fastint integrators as HuggingFace diffusers schedulers (optional extra ``fastint[diffusers]``).

One line swaps a pipeline's scheduler::

    from fastint.diffusers import LambdaDDIMScheduler
    pipe.scheduler = LambdaDDIMScheduler.from_config(pipe.scheduler.config)

Classes: ``DDIMScheduler`` (a drop-in for diffusers' DDIMScheduler, eta included),
``LambdaDDIMScheduler`` (B = lam*I) and ``ConjugateMultistepScheduler`` (conj_ms, DEIS tAB).
Each subclasses diffusers' ``SchedulerMixin`` and ``ConfigMixin``; this module re-exports
``SchedulerMixin`` so that ``DiffusionPipeline.from_pretrained`` reloads a pipeline saved
with one of them (it looks the base class up in the module named in ``model_index.json``).

Time convention: diffusers timestep k (ᾱ = alphas_cumprod[k]) is fastint time t = (k+1)/N
on ``VPSDE(alphas_cumprod=...)``, whose knot t_i = i/N holds ᾱ_{i-1}. Every step's row of
the coefficient table comes from ``torch.ops.fastint.coefficients`` (one call per step, on
the schedule truncated at that step) and the update itself is ``torch.ops.fastint.step``.
Details and limitations: docs/dropin.md.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import (
    DDIMSchedulerOutput,
    betas_for_alpha_bar,
    rescale_zero_terminal_snr,
)
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .coefficients import build_table
from .ops import step as fused_step
from .processes import VPSDE
from .tuning import tuned_lambda

__all__ = ["DDIMScheduler", "LambdaDDIMScheduler", "ConjugateMultistepScheduler", "SchedulerMixin",
           "ConfigMixin", "schedule_rows"]

_F64 = torch.float64
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
_WIDTH = {"ddim": 11, "lambda_ddim": 11, "sddim": 11, "conj_ms": 19}


# --------------------------------------------------------------------------- tables
def _extended(ac64, need):
    """alphas_cumprod (float64) continued past its end with the last step's β, to ``need`` entries:
    a conj_ms row is read off a uniform grid that may start above the last knot; only the
    integral over the row's own interval is used, so the continuation never enters a result."""
    n = ac64.numel()
    if need <= n:
        return ac64
    slope = float(torch.log(ac64[-2] / ac64[-1])) if n > 1 else 0.01  # last step of B = -log ᾱ
    slope = min(max(slope, 1e-6), 0.1)  # bounded so that ᾱ stays far from underflow
    r = torch.arange(1, need - n + 1, dtype=_F64)
    return torch.cat([ac64, ac64[-1] * torch.exp(-slope * r)])


def _op_table(ac, N, start, end, n_steps, method, denoise=False, **opts):
    """build_table on the schedule truncated to knots 0..start (t_i = i/N), uniform grid from
    knot ``start`` down to knot ``end`` (>= 1) in ``n_steps`` steps."""
    if start > ac.numel():  # a truncated schedule would silently shift every knot
        raise RuntimeError(f"internal: schedule of {ac.numel()} knots extended too little for knot {start}")
    sde = VPSDE(alphas_cumprod=ac[:start], T=start / N)
    table, _ = build_table(sde, method, "uniform", n_steps, t_eps=end / N, denoise=denoise, **opts)
    return table


def _lagrange_at(nodes, j, x):
    out = 1.0
    for m, tm in enumerate(nodes):
        if m != j:
            out *= (x - tm) / (nodes[j] - tm)
    return out


def _weights_on(ext, N, i, j, actual):
    """(P and S entries [7], weights [len(actual), 4]) of the step from knot i to knot j with ε
    interpolated through the knot positions ``actual``: the op's uniform-grid conj_ms row on
    that step (nodes τ_l = i + l (i − j)), its Lagrange weights re-expressed on the actual
    nodes (ℓ^A_a = Σ_l ℓ^A_a(τ_l) ℓ^U_l, exact for polynomials of degree < len(actual))."""
    m, h = len(actual), i - j
    uni = _op_table(ext, N, i + (m - 1) * h, j, m, "conj_ms", k=m)[m - 1]
    tau = [float(i + l * h) for l in range(m)]
    return uni[:7], torch.stack([sum(_lagrange_at(actual, a, tau[l]) * uni[7 + 4 * l: 11 + 4 * l] for l in range(m))
                                 for a in range(m)])


def schedule_rows(alphas_cumprod, knots, final, method, order=1, corrector_points=0, prev_order=None, **opts):
    """float64 table [len(knots), W] of ``method`` stepping through the knot indices ``knots``
    (strictly decreasing, i = k + 1 for diffusers timestep k, with t_i = i/N).

    Row n maps knot knots[n] to knots[n+1]; the last row maps to ``final``: 0 for σ = 0 (the
    Tweedie / denoising row) or a knot index >= 1. conj_ms rows use min(order, n + 1) past
    outputs: each comes from the op's uniform-grid conj_ms row on the same interval, whose
    Lagrange weights on uniform nodes are re-expressed on the actual nodes (ℓ^A_j = Σ_l
    ℓ^A_j(τ_l) ℓ^U_l is exact for polynomials of degree < order).

    ``corrector_points`` >= 2 (conj_ms): row n also carries the Adams–Moulton correction of
    step n − 1 through min(corrector_points, n + 1) outputs, newest ε_n first, minus that
    step's predictor (which used min(prev_order, n) outputs; default prev_order = order), times
    row n's P: the `corrector` of conj_ms (docs/integrators.md §3), on arbitrary knots. The
    σ = 0 (x̂0) row carries none (measured better on DDPM knots, docs/dropin.md).
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=_F64)
    N = ac.numel()
    ks = [int(i) for i in knots]
    targets = ks[1:] + [int(final)]
    need = max(ks) + 1
    if method == "conj_ms":  # uniform grids above a step reach up to (points - 1) steps past its start
        need = max([need] + [i + (min(order, n + 1) - 1) * (i - j) for n, (i, j) in enumerate(zip(ks, targets))])
        if corrector_points >= 2:  # step n's correction (in row n + 1) uses min(points, n + 2) nodes
            need = max([need] + [i + (min(corrector_points, n + 2) - 1) * (i - j)
                                 for n, (i, j) in enumerate(zip(ks, targets))])
    ext = _extended(ac, need)
    rows = torch.zeros(len(ks), _WIDTH[method], dtype=_F64)
    for n, (i, j) in enumerate(zip(ks, targets)):
        single = "ddim" if method == "conj_ms" else method
        sopts = {} if method == "conj_ms" else opts
        if j == i:  # the last timestep already sits on the final knot: identity
            rows[n, 0] = 1.0
        elif j == 0:  # to σ = 0: the op's denoising (Tweedie) row at knot i
            row = _op_table(ext, N, i + 1, i, 1, single, True, **sopts)[-1]
            rows[n, : row.numel()] = row
        elif method != "conj_ms" or min(order, n + 1) == 1:
            row = _op_table(ext, N, i, j, 1, single, **sopts)[0]
            rows[n, : row.numel()] = row
        else:
            m = min(order, n + 1)
            actual = [float(x) for x in ks[n - m + 1: n + 1][::-1]]  # nodes t_n, t_{n-1}, ...
            rows[n, :7], w = _weights_on(ext, N, i, j, actual)
            rows[n, 7: 7 + 4 * m] = w.flatten()
    if method == "conj_ms" and corrector_points >= 2:
        prev_order = order if prev_order is None else prev_order
        # the predictor rows the previous steps actually used
        pred = rows.clone() if prev_order == order else schedule_rows(ac, knots, final, method, order=prev_order)
        for n in range(1, len(ks)):
            cnt = min(corrector_points, n + 1)
            i, j = ks[n - 1], ks[n]
            # Not into the σ = 0 (x̂0) row: near t = 0 on DDPM knots the correction through
            # ε at knot 1 costs accuracy (measured: observed order 2.4 with it, 3.1 without).
            if cnt < 2 or j == i or targets[n] == 0:
                continue
            D = torch.zeros(3, 4, dtype=_F64)  # on eps_n, eps_{n-1}, eps_{n-2}
            D[:cnt] = _weights_on(ext, N, i, j, [float(x) for x in ks[n - cnt + 1: n + 1][::-1]])[1]
            for a in range(1, min(prev_order, n, 2) + 1):
                D[a] -= pred[n - 1, 7 + 4 * (a - 1): 11 + 4 * (a - 1)]
            for a in range(3):
                rows[n, 7 + 4 * a: 11 + 4 * a] += rows[n, 0] * D[a]
    return rows


# --------------------------------------------------------------------------- schedulers
def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class _FastintScheduler(SchedulerMixin, ConfigMixin):
    """Shared machinery of the fastint schedulers (not a scheduler itself)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _method = "ddim"

    # ---- schedule ----------------------------------------------------------------------
    def _setup(self):
        c = self.config
        _check_choice("prediction_type", c.prediction_type, _PREDICTIONS)
        _check_choice("timestep_spacing", c.timestep_spacing, _SPACINGS)
        N = c.num_train_timesteps
        if isinstance(N, bool) or not isinstance(N, numbers.Integral) or N < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {N!r}")
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float32)
        elif c.beta_schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, N, dtype=torch.float32)
        elif c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, N, dtype=torch.float32) ** 2
        elif c.beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(N)
        else:
            raise ValueError(f"beta_schedule must be one of ['linear', 'scaled_linear', 'squaredcos_cap_v2'], "
                             f"got {c.beta_schedule!r}")
        if c.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        ac64 = self.alphas_cumprod.to(_F64)
        if c.rescale_betas_zero_snr:  # ᾱ_N = 0 has no finite log-SNR; as diffusers' Euler schedulers do
            ac64[-1] = 2.0**-24
        self._ac64 = ac64
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, N)[::-1].copy().astype(np.int64))
        self._knots = None
        self._step_index = None
        self._begin_index = None
        self._hist = []
        self._cache = {}

    @property
    def step_index(self):
        """Index of the next step (None before the first call to step)."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline with set_begin_index (img2img), else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start stepping at ``timesteps[begin_index]`` (pipelines call this before the loop)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """Identity: VP models take the sample unscaled."""
        return sample

    def _spaced(self, n):
        c = self.config
        N = c.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
        if not 1 <= n <= N:
            raise ValueError(f"num_inference_steps must lie in [1, num_train_timesteps={N}], got {n}")
        if c.timestep_spacing == "linspace":
            return np.linspace(0, N - 1, n).round()[::-1].copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = N // n
            return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + int(c.steps_offset)
        return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """Choose the inference timesteps (by ``timestep_spacing``, or given explicitly as a strictly
        decreasing list in [0, num_train_timesteps)) and build the coefficient table."""
        N = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps needs exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            ks = self._spaced(num_inference_steps)
        else:
            ks = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if ks.ndim != 1 or ks.size == 0 or not np.issubdtype(ks.dtype, np.number):
                raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints, got {timesteps!r}")
            if not np.all(ks == np.round(ks)):
                raise ValueError("timesteps must be integers")
            ks = ks.astype(np.int64)
        if np.any(np.diff(ks) >= 0):
            raise ValueError(f"timesteps must be strictly decreasing, got {ks.tolist()}")
        if ks.min() < 0 or ks.max() >= N:
            raise ValueError(f"timesteps must lie in [0, num_train_timesteps={N}), got {ks.tolist()}")
        self.num_inference_steps = len(ks)
        self.timesteps = torch.from_numpy(ks).to(device)
        self._knots = [int(k) + 1 for k in ks]
        self._cache = {}
        self._step_index = None
        self._begin_index = None
        self._hist = []

    # ---- per-method hooks ----------------------------------------------------------------
    def _final_knot(self):
        return 0

    def _rows(self, variant):
        """float64 table [R, W] for this scheduler (variant: eta for DDIM, history order for conj_ms)."""
        raise NotImplementedError

    def _coef(self, variant, device):
        """The float32 coefficient table on ``device``, built once per variant and device."""
        key = (variant, str(device))
        if key not in self._cache:
            self._cache[key] = self._rows(variant).to(device=device, dtype=torch.float32).contiguous()
        return self._cache[key]

    def _alpha_sigma(self, n, device):
        """(√ᾱ, √(1 − ᾱ)) of step n as 0-d float32 tensors on ``device`` (no host sync)."""
        key = ("ab", str(device))
        if key not in self._cache:
            a2 = self._ac64[torch.tensor(self._knots) - 1]
            self._cache[key] = (a2.sqrt().to(device=device, dtype=torch.float32),
                                (1 - a2).sqrt().to(device=device, dtype=torch.float32))
        al, sg = self._cache[key]
        return al[n], sg[n]

    # ---- stepping --------------------------------------------------------------------------
    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        ts = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(ts.device)
        hits = (ts == timestep).nonzero()  # one lookup before the first step, as diffusers does
        if len(hits) == 0:
            raise ValueError(f"timestep {timestep} is not in scheduler.timesteps; call set_timesteps first")
        self._step_index = int(hits[0])

    def _prepare(self, model_output, timestep, sample):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have sample's shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        if sample.ndim < 2:
            raise ValueError(f"sample must be a batch [B, C, ...], got shape {tuple(sample.shape)}")
        if self._step_index is None:
            self._init_step_index(timestep)
            self._hist = []
        n = self._step_index
        if n >= self.num_inference_steps:
            raise ValueError(f"step called {n + 1} times, but set_timesteps chose {self.num_inference_steps} steps")
        return n

    def _eps_x0(self, model_output, sample, a, s):
        """(ε, x̂0, state fed to the step) from the model output, with clipping / thresholding of x̂0."""
        c = self.config
        out = model_output.to(sample.dtype)
        if c.prediction_type == "epsilon":
            eps = out
            x0 = None
        elif c.prediction_type == "sample":
            x0 = out
            eps = (sample - a * x0) / s
        else:  # v = a ε − s x0
            eps = a * out + s * sample
            x0 = a * sample - s * out
        z = sample
        if getattr(c, "thresholding", False) or getattr(c, "clip_sample", False):
            if x0 is None:
                x0 = (sample - s * eps) / a
            if c.thresholding:
                x0 = self._threshold_sample(x0)
            else:
                x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
            z = a * x0 + s * eps  # the state whose x̂0 is the clipped one (DDIM's clipped update)
        return eps, x0, z

    def _threshold_sample(self, sample):
        """Dynamic thresholding (Imagen), as diffusers' schedulers do it."""
        dtype = sample.dtype
        b, ch, *rest = sample.shape
        x = sample.float().reshape(b, ch * int(np.prod(rest)))
        s = torch.quantile(x.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(x, -s, s) / s).reshape(b, ch, *rest).to(dtype)

    # ---- forward process -------------------------------------------------------------------
    def _sqrt_ab(self, timesteps, like):
        ac = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        t = timesteps.to(like.device) if isinstance(timesteps, torch.Tensor) else torch.as_tensor(timesteps, device=like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = ac[t].flatten()
        return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_k = √ᾱ_k x0 + √(1 − ᾱ_k) ε (the forward process at diffusers timesteps)."""
        a, s = self._sqrt_ab(timesteps, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = √ᾱ ε − √(1 − ᾱ) x0."""
        a, s = self._sqrt_ab(timesteps, sample)
        return a * noise - s * sample

    def __len__(self):
        return self.config.num_train_timesteps


class DDIMScheduler(_FastintScheduler):
    """diffusers' DDIMScheduler (same config, same results) with the update in fastint's fused op.

    ``eta > 0`` in ``step`` is stochastic DDIM (noise from ``generator`` as diffusers draws it,
    or ``variance_noise``). The step after ``timesteps[n]`` always goes to ``timesteps[n+1]``
    (diffusers goes to ``t - N // num_inference_steps``, the same for 'leading' spacing), and the
    last to ᾱ = 1 (``set_alpha_to_one``) or to ᾱ_0.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        self._setup()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def _final_knot(self):
        return 0 if self.config.set_alpha_to_one else 1

    def _rows(self, eta):
        if eta == 0.0:
            return schedule_rows(self._ac64, self._knots, self._final_knot(), "ddim")
        return schedule_rows(self._ac64, self._knots, self._final_knot(), "sddim", eta=eta)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        """One DDIM step from ``timestep`` to the next timestep; returns (prev_sample, pred_original_sample)."""
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
        eta = float(eta)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass at most one of generator and variance_noise")
        n = self._prepare(model_output, timestep, sample)
        coef = self._coef(eta, sample.device)
        a, s = self._alpha_sigma(n, sample.device)
        eps, x0, z = self._eps_x0(model_output, sample, a, s)
        if x0 is None:
            x0 = (sample - s * eps) / a
        if use_clipped_model_output and z is not sample:
            eps, z = (sample - a * x0) / s, sample
        noise = None
        if eta > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev = fused_step(z, [eps.to(z.dtype)], coef, n, 1, noise=noise)
        self._step_index = n + 1
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class _ConjugateScheduler(_FastintScheduler):
    def _final_knot(self):
        t = self.config.final_sigmas_type
        _check_choice("final_sigmas_type", t, ("zero", "sigma_min"))
        return 0 if t == "zero" else 1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One step from ``timestep`` to the next timestep (deterministic: ``generator`` is unused)."""
        n = self._prepare(model_output, timestep, sample)
        eps, _, z = self._eps_x0(model_output, sample, *self._alpha_sigma(n, sample.device))
        hist = [eps.to(z.dtype)] + self._hist[: self._history - 1]
        coef = self._coef(len(hist), sample.device)
        prev = fused_step(z, hist, coef, n, 1)
        self._hist = hist
        self._step_index = n + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


class LambdaDDIMScheduler(_ConjugateScheduler):
    """fastint's lambda_ddim (conjugate integrator with B = lam·I in t = (k+1)/N) as a diffusers scheduler.

    ``lam=None`` takes the value tuned for VP at this number of steps (fastint.tuning);
    ``lam=0`` is DDIM. ``final_sigmas_type``: 'zero' ends at σ = 0 (x̂0), 'sigma_min' at ᾱ_0.
    """

    _history = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, lam: float | None = None,
                 prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False):
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, numbers.Real)
                                or not math.isfinite(lam)):
            raise ValueError(f"lam must be a finite float or None, got {lam!r}")
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._setup()

    @property
    def lam(self):
        """The λ in use: the config's, or the tuned one for the current number of steps."""
        if self.config.lam is not None:
            return float(self.config.lam)
        return tuned_lambda(VPSDE(), self.num_inference_steps or 50, b="identity")[0]

    def _rows(self, _):
        return schedule_rows(self._ac64, self._knots, self._final_knot(), "lambda_ddim", lam=self.lam,
                             b="identity")


class ConjugateMultistepScheduler(_ConjugateScheduler):
    """fastint's conj_ms (exponential multistep: ε Lagrange-interpolated in t through the last
    ``solver_order`` outputs; DEIS tAB on VP) as a diffusers scheduler.

    Steps with fewer past outputs (the first ones, or after set_begin_index) use lower order;
    the last step to σ = 0 is the x̂0 (Tweedie) step. ``corrector=True`` (solver_order <= 2)
    adds conj_ms's Adams–Moulton corrector: each step also corrects the previous one with
    the newest output, at no extra model call (order solver_order + 1).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False, corrector: bool = False):
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if not isinstance(corrector, bool):
            raise TypeError(f"corrector must be a bool, got {type(corrector).__name__}")
        if corrector and solver_order == 3:
            raise ValueError("corrector=True needs solver_order <= 2 (the correction reads solver_order + 1 "
                             "outputs; a row holds 3)")
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._setup()

    @property
    def _history(self):
        return int(self.config.solver_order) + int(self.config.corrector)

    def _rows(self, n_outputs):
        """Rows for a step that has ``n_outputs`` model outputs in its history."""
        k = int(self.config.solver_order)
        if not self.config.corrector:
            return schedule_rows(self._ac64, self._knots, self._final_knot(), "conj_ms", order=min(k, n_outputs))
        return schedule_rows(self._ac64, self._knots, self._final_knot(), "conj_ms", order=min(k, n_outputs),
                             corrector_points=n_outputs, prev_order=min(k, n_outputs - 1))
