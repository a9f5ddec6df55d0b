"""fastint integrators as HuggingFace diffusers schedulers (optional extra ``fastint[diffusers]``).

One line swaps a pipeline's scheduler::

    from fastint.diffusers import ConjugateMultistepScheduler
    pipe.scheduler = ConjugateMultistepScheduler.from_config(pipe.scheduler.config)

Classes: ``DDIMScheduler`` (a drop-in for diffusers' DDIMScheduler, eta included),
``LambdaDDIMScheduler`` (B = lam*I) and ``ConjugateMultistepScheduler`` (conj_ms: exponential
multistep, optional corrector, interpolation in t or in log-SNR). Each subclasses diffusers'
``SchedulerMixin`` and ``ConfigMixin``; this module re-exports ``SchedulerMixin`` so that
``DiffusionPipeline.from_pretrained`` reloads a pipeline saved with one of them (it looks the
base class up in the module named in ``model_index.json``; the reloading process must have
imported ``fastint.diffusers``).

Knots: the multistep schedulers choose timesteps and sigmas exactly as diffusers'
``DPMSolverMultistepScheduler`` does for the same config (spacing, Karras / exponential / beta /
Lu sigmas, final sigma, custom timesteps or sigmas). ``set_timesteps`` maps the sigmas to times
of the discrete VP process once (docs/design.md, "Adapters") and builds the whole coefficient
table there, in one call of ``torch.ops.fastint.coefficients``; ``step`` applies one row with
``torch.ops.fastint.step``. Config keys (and from_config keyword arguments) a class does not
implement are named in one warning; flow-matching keys raise. Details and limitations: docs/dropin.md.
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
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from . import grids
from .checks import is_int
from .flow import FLOW_INTERP, flow_table
from .flow_schedule import FLOWMATCH_DEFAULTS, flowmatch_schedule, flowmatch_training_sigmas
from .processes import VPSDE
from .table import check_finite, make_table, table_dtype
from .tuning import tuned_lambda_on_knots

__all__ = ["DDIMScheduler", "LambdaDDIMScheduler", "ConjugateMultistepScheduler", "FlowMatchConjugateScheduler",
           "SchedulerMixin",
           "ConfigMixin", "dpm_schedule"]

logger = logging.get_logger(__name__)

_F64 = torch.float64
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
# Config keys of other schedulers that cannot be honoured here: a value other than the inactive
# ones raises (flow matching is a different process; a learned variance is split off in step).
_UNSUPPORTED = {"use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
                "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                  "learned", "learned_range"),
                "shift_terminal": (None,), "invert_sigmas": (False,)}
# final_step="multistep" ends at this sigma instead of 0 (a time of the process must be > 0);
# the state there differs from x0 by FINAL_SIGMA * eps, far below float32 resolution of images.
FINAL_SIGMA = 1e-5
# Keys whose value means "off": ignoring them changes nothing, so they are not reported.
_INACTIVE = (False, None)
# ... except for these keys, whose "off" value is another one (DDIM's set_alpha_to_one=True ends at
# ᾱ = 1, which is what the multistep classes do with final_sigmas_type='zero')
_INACTIVE_FOR = {"set_alpha_to_one": (True,)}
# variance_type values whose model output carries a learned variance in extra channels
_LEARNED = ("learned", "learned_range")
_VARIANCE_TYPES = _UNSUPPORTED["variance_type"]
# The smallest ᾱ the process is built with: a smaller one (or an ᾱ <= 0 from betas >= 1) is raised
# to it, so that the float32 coefficients stay finite (1/√ᾱ ≤ 1e30).
_AC_FLOOR = 1e-60


# --------------------------------------------------------------------------- knots
def _sigma_to_t(sigma, log_sigmas):
    """diffusers' fractional timestep of ``sigma``: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _sigma_schedules(config):
    """The sigma-schedule keys (Karras, exponential, beta, Lu) set in ``config`` (a mapping)."""
    return [k for k in _SIGMA_SCHEDULES if config.get(k, False)]


def dpm_schedule(config, alphas_cumprod, num_inference_steps=None, timesteps=None, sigmas=None):
    """(timesteps int64 [n], model sigmas float64 [n], final sigma, from_knots) exactly as
    diffusers' DPMSolverMultistepScheduler.set_timesteps chooses them for ``config``
    (timestep_spacing, steps_offset, lambda_min_clipped, use_karras / exponential / beta / lu
    sigmas, final_sigmas_type), or for custom ``timesteps`` / ``sigmas`` (model sigmas, decreasing;
    a trailing 0 is the final sigma). ``from_knots``: the sigmas sit on integer timesteps."""
    c = config
    N = c.num_train_timesteps
    ac = alphas_cumprod  # float32, as diffusers computes with it
    all_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    log_sigmas = np.log(all_sigmas)
    kinds = _sigma_schedules(c)
    if len(kinds) > 1:
        raise ValueError(f"only one of {kinds} can be True")
    given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                  ("sigmas", sigmas)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"set_timesteps needs exactly one of num_inference_steps, timesteps and sigmas, got {given}")
    final = 0.0 if getattr(c, "final_sigmas_type", "zero") == "zero" else float(all_sigmas[0])
    if timesteps is not None or sigmas is not None:
        if kinds:
            raise ValueError(f"custom timesteps or sigmas cannot be combined with {kinds[0]}=True")
        vals = timesteps if timesteps is not None else sigmas
        arr = np.asarray(vals.detach().cpu() if isinstance(vals, torch.Tensor) else vals, dtype=np.float64)
        name = "timesteps" if timesteps is not None else "sigmas"
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers, got {vals!r}")
        if timesteps is not None:
            if not np.all(arr == np.round(arr)):
                raise ValueError("timesteps must be integers")
            if arr.min() < 0 or arr.max() >= N:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps={N}), got {arr.tolist()}")
            ts = arr.astype(np.int64)
            return ts, np.interp(ts, np.arange(N), all_sigmas), final, True
        if arr.size > 1 and arr[-1] == 0:
            arr, final = arr[:-1], 0.0
        if np.any(arr <= 0):
            raise ValueError(f"sigmas must be positive (but a final 0), got {vals!r}")
        return np.round(_sigma_to_t(arr, log_sigmas)).astype(np.int64), arr, final, False
    n = num_inference_steps
    if not is_int(n):
        raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
    if not 1 <= n <= N:
        raise ValueError(f"num_inference_steps must lie in [1, num_train_timesteps={N}], got {n}")
    lambda_t = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    clipped = torch.searchsorted(torch.flip(lambda_t, [0]), getattr(c, "lambda_min_clipped", -math.inf))
    last = int(N - clipped)
    end = getattr(c, "last_timestep", None)
    if end is not None:  # fastint's own spacing: the last n of n + 1 uniform timesteps down to last_timestep
        if end >= last - 1:
            raise ValueError(f"last_timestep = {end} must lie below the first timestep {last - 1} "
                             "(lambda_min_clipped cuts the schedule there)")
        ts = np.linspace(last - 1, end, n + 1)[1:].round().astype(np.int64)
        return ts, np.interp(ts, np.arange(N), all_sigmas), final, True
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif c.timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + int(c.steps_offset)
    else:
        ts = np.arange(last, 0, -N / n).round().copy().astype(np.int64) - 1
    if not kinds:
        if ts.max() >= N:  # diffusers indexes past its sigmas here (IndexError)
            raise ValueError(f"timestep_spacing='leading' with steps_offset={c.steps_offset} and "
                             f"num_inference_steps={n} puts a timestep at {int(ts.max())}, past "
                             f"num_train_timesteps - 1 = {N - 1}; use fewer steps")
        return ts, np.interp(ts, np.arange(N), all_sigmas), final, True
    lo, hi = float(all_sigmas[0]), float(all_sigmas[-1])
    if kinds[0] == "use_karras_sigmas":
        sig = grids.karras_sigmas(hi, lo, n)
    elif kinds[0] == "use_exponential_sigmas":
        sig = grids.exponential_sigmas(hi, lo, n)
    elif kinds[0] == "use_beta_sigmas":
        sig = grids.beta_sigmas(hi, lo, n)
    else:  # Lu et al.'s uniform log-SNR (DPM-Solver's use_lu_lambdas)
        lmax, lmin = float(np.flip(log_sigmas)[0]), float(np.flip(log_sigmas)[-1])
        sig = np.exp(lmax + np.linspace(0, 1, n) * (lmin - lmax))
    ts = _sigma_to_t(sig, log_sigmas)
    if kinds[0] in ("use_karras_sigmas", "use_lu_lambdas") and c.beta_schedule != "squaredcos_cap_v2":
        ts = ts.round()
    return ts.astype(np.int64), sig, final, False


# --------------------------------------------------------------------------- schedulers
def _check_finite(z, where):
    """fastint.table.check_finite (one host read, after the last step), with a message that names
    what a scheduler's user can do: the schedulers have no option to skip the check."""
    return check_finite(z, where, hint="check the model and its inputs: a NaN in the model output; a float16 "
                        "overflow, which float32 or bfloat16 avoids; the guidance scale")


def _promoted(sample, model_output):
    """``sample`` in the dtype diffusers' DDIM and DPM-Solver steps return: the promotion of both
    (a float32 model output on float16 latents gives float32), as their tensor arithmetic does."""
    dt = torch.promote_types(sample.dtype, model_output.dtype)
    return sample if dt == sample.dtype else sample.to(dt)


class _NotInScheduleError(ValueError, IndexError):
    """A timestep that is not in scheduler.timesteps (both error types: code written for
    diffusers catches the IndexError of its empty lookup)."""


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class _StepState:
    """What every fastint scheduler shares once its table is built (not a scheduler itself): the
    step index and begin index, the first-step lookup of a timestep, the checks of step's
    arguments, and the warning naming config keys a class ignores. A subclass provides
    ``timesteps``, ``num_inference_steps``, ``_build(first)`` (the table from step ``first`` on)
    and ``_row0`` (the step its table starts at)."""

    @classmethod
    def _warn_ignored(cls, init, hidden, skip=(), kwargs=None):
        """One warning naming the config keys this class does not implement, from the config
        (``hidden``) and from from_config's keyword arguments (``kwargs``); ``skip``: keys handled
        otherwise. Keys whose value means "off" are not reported."""
        def report(d):
            return {k: v for k, v in d.items()
                    if not k.startswith("_") and k not in init and k not in skip
                    and not any(v is off for off in _INACTIVE_FOR.get(k, _INACTIVE))}

        kept = report(hidden)
        dropped = report({k: v for k, v in (kwargs or {}).items()
                          if k not in kept and k != "dtype" and k not in cls._deprecated_kwargs})
        parts = []
        if kept:
            parts.append(", ".join(f"{k}={v!r}" for k, v in sorted(kept.items()))
                         + " (they keep their value in the config)")
        if dropped:
            parts.append("keyword arguments " + ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items()))
                         + " (not stored in the config)")
        if parts:
            logger.warning(f"{cls.__name__} ignores config keys it does not implement: " + "; ".join(parts))

    @property
    def table(self):
        """The fastint Table (float64) that set_timesteps built (None before it, or when the
        only knot is the final one)."""
        return self._table

    @property
    def step_index(self):
        """Index of the next step (None before the first call to step)."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline with set_begin_index (img2img), else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start stepping at ``timesteps[begin_index]`` (pipelines call this before the loop): the
        table is rebuilt on the remaining knots, with an empty history."""
        if not is_int(begin_index) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        if self._step_index is not None:
            raise ValueError("set_begin_index must be called before the first step (after set_timesteps)")
        if self.num_inference_steps is not None and begin_index >= self.num_inference_steps:
            raise ValueError(f"begin_index must be < num_inference_steps={self.num_inference_steps}, got {begin_index}")
        self._begin_index = int(begin_index)
        if self.num_inference_steps is not None and self._begin_index != self._row0:
            self._build(self._begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """The index of ``timestep`` in the schedule. A repeated timestep (sigma schedules at many
        steps) gives its second occurrence, as diffusers' index_for_timestep does, so that img2img
        without set_begin_index starts where diffusers does."""
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(ts.device)
        hits = (ts == timestep).nonzero()  # one lookup before the first step, as diffusers does
        if len(hits) == 0:
            return self._not_in_schedule(timestep, ts)
        return int(hits[1 if len(hits) > 1 else 0])

    def _not_in_schedule(self, timestep, ts):
        """A timestep that is not in the schedule: an error (an IndexError too, as diffusers' empty
        lookup raises)."""
        raise _NotInScheduleError(f"timestep {timestep} is not in scheduler.timesteps; call set_timesteps first")

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif len(self.timesteps) and bool(torch.as_tensor(timestep).reshape(-1)[0].to(self.timesteps.device)
                                          == self.timesteps[0]):
            self._step_index = 0  # the schedule's first timestep starts it, even where it repeats
        else:  # (diffusers' lookup takes the second of two equal timesteps: an img2img restart)
            self._step_index = self.index_for_timestep(timestep)
        if self._step_index != self._row0:
            self._build(self._step_index)

    def _prepare(self, model_output, timestep, sample, batch=True):
        """The step index of this call, after checking step's arguments (``batch``: the sample
        must be [B, C, ...]; else any tensor with at least one dimension)."""
        self._check_step_args(model_output, sample, batch)
        if self._step_index is None:
            self._init_step_index(timestep)
            self._hist = []
        n = self._step_index
        if n >= self.num_inference_steps:
            raise ValueError(f"step called {n + 1} times, but set_timesteps chose {self.num_inference_steps} steps")
        return n

    def _check_step_args(self, model_output, sample, batch=True):
        """The checks of step's arguments that do not depend on the timestep."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have sample's shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        if batch and sample.ndim < 2:
            raise ValueError(f"sample must be a batch [B, C, ...], got shape {tuple(sample.shape)}")
        if sample.ndim == 0:
            raise ValueError("sample must have at least one dimension, got a 0-d tensor")


class _FastintScheduler(_StepState, SchedulerMixin, ConfigMixin):
    """Shared machinery of the fastint schedulers (not a scheduler itself): the discrete VP
    process of the config, the knots, one Table per set_timesteps, and the step."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    # rescale_betas_zero_snr: the public alphas_cumprod[-1] is 2^-24 (DPM-Solver's and UniPC's
    # convention); DDIMScheduler keeps diffusers' DDIM 0 there (the process uses 2^-24 in both)
    _public_zero_snr_floor = True

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config filtering, plus: keys this class does not implement are named in one
        warning (never silently ignored), and flow-matching keys raise."""
        merged = {**config_dict, **kwargs}
        init, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        own = set(cls._get_init_keys(cls))
        for key, allowed in _UNSUPPORTED.items():
            if key not in own and merged.get(key, allowed[0]) not in allowed:
                flow = key != "variance_type"
                raise ValueError(f"{cls.__name__} does not support {key}={merged[key]!r} "
                                 + ("(a flow-matching setting): use FlowMatchConjugateScheduler.from_config for a "
                                    "flow-matching pipeline" if flow else
                                    "(an unknown value): keep the pipeline's own scheduler for it"))
        cls_name = merged.get("_class_name")
        flow_keys = sorted(k for k in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
                           if k in merged)
        if (isinstance(cls_name, str) and cls_name.startswith("FlowMatch")) or flow_keys:
            raise ValueError(f"{cls.__name__} is for DDPM-style (VP) models; this is a flow-matching config "
                             f"({cls_name or ', '.join(flow_keys)}): keep the pipeline's own scheduler for it")
        if merged.get("prediction_type") == "flow_prediction":
            raise ValueError(f"{cls.__name__} does not support prediction_type='flow_prediction'")
        cls._warn_ignored(init, hidden, skip=_UNSUPPORTED, kwargs=kwargs)
        return init, unused, hidden

    # ---- schedule ----------------------------------------------------------------------
    def _setup(self):
        c = self.config
        _check_choice("prediction_type", c.prediction_type, _PREDICTIONS)
        _check_choice("timestep_spacing", c.timestep_spacing, _SPACINGS)
        N = c.num_train_timesteps
        if not is_int(N) or N < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {N!r}")
        self._config_error = None
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float32)
            if betas.ndim != 1 or betas.numel() < 2:
                raise ValueError(f"trained_betas must be a sequence of at least 2 values, got shape {tuple(betas.shape)}")
            if betas.numel() != N:  # kept in the config (it saves and loads), refused when used
                self._config_error = (f"trained_betas must hold num_train_timesteps = {N} values, got "
                                      f"{betas.numel()}")
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
        if c.rescale_betas_zero_snr and self._public_zero_snr_floor:  # as diffusers' DPM / UniPC schedulers
            self.alphas_cumprod[-1] = 2.0**-24
        ac64 = self.alphas_cumprod.to(_F64)
        if c.rescale_betas_zero_snr:  # ᾱ_N = 0 has no finite log-SNR: the process uses 2^-24 there
            ac64[-1] = 2.0**-24
        # ᾱ below float32's normal range (a large beta_end underflows the float32 product to 0, where
        # diffusers still steps) takes the float64 product; betas >= 1 make it <= 0: floored, and named
        low = ac64 < 2.0**-126
        if bool(low.any()):
            exact = torch.cumprod(1 - betas.to(_F64), 0)
            if bool((exact[low] <= _AC_FLOOR).any()):
                k = int(torch.nonzero(low & (exact <= _AC_FLOOR))[0])
                logger.warning(f"{type(self).__name__}: alphas_cumprod falls below {_AC_FLOOR:g} (or to <= 0, from "
                               f"betas >= 1) from timestep {k} on; the process is built with {_AC_FLOOR:g} there "
                               "(a model input with no signal left, where diffusers divides by ~0)")
            ac64 = torch.where(low, exact.clamp(min=_AC_FLOOR), ac64)
        # Rescaled or trained schedules may repeat ᾱ in float32: nudge to strictly decreasing
        # (one ulp of float64 at most per knot), since B(t) = −log ᾱ must increase.
        for i in range(1, ac64.numel()):
            if ac64[i] >= ac64[i - 1]:
                ac64[i] = ac64[i - 1] * (1 - 2.0**-40)
        self._ac64 = ac64
        # The discrete VP process: knot t_i = i/N holds ᾱ_{i−1}, so diffusers timestep k is t = (k+1)/N.
        self._sde = VPSDE(alphas_cumprod=ac64, T=1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, N)[::-1].copy().astype(np.int64))
        self.sigmas = None
        self._table = None
        self._row0 = 0
        self._times = None
        self._step_index = None
        self._begin_index = None
        self._hist = []
        self._dev = {}

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """Identity: VP models take the sample unscaled."""
        return sample

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """DDIM's variance (σ_t/η)² = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev) between two
        diffusers timesteps (a negative ``prev_timestep`` is the final ᾱ: DDIM's
        ``final_alpha_cumprod``, 1 for the multistep classes), as diffusers'
        DDIMScheduler._get_variance computes it (code written against DDIM calls it)."""
        a_t = self.alphas_cumprod[timestep]
        final = getattr(self, "final_alpha_cumprod", torch.tensor(1.0))
        a_p = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else final
        return (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)

    def _knots(self, num_inference_steps, timesteps, sigmas):
        """(timesteps int64 numpy, model sigmas float64, final sigma, from_knots): DPM-Solver's choice."""
        return dpm_schedule(self.config, self.alphas_cumprod, num_inference_steps, timesteps, sigmas)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """Choose the knots (``timestep_spacing`` and the sigma options of the config, or custom
        ``timesteps`` / ``sigmas``) and build the whole coefficient table for them."""
        if self._config_error is not None:
            raise ValueError(self._config_error)
        ts, sig, final, from_knots = self._knots(num_inference_steps, timesteps, sigmas)
        N = self.config.num_train_timesteps
        if from_knots:  # sigmas on integer timesteps: their exact knot times
            times = (torch.as_tensor(ts, dtype=_F64) + 1) / N
        else:
            s64 = torch.as_tensor(sig, dtype=_F64)
            s_max = float(((1 - self._ac64[-1]) / self._ac64[-1]).sqrt())
            if float(s64.max()) > s_max * (1 + 1e-6):
                raise ValueError(f"sigmas must not exceed the schedule's sigma_max = {s_max:.6g} "
                                 f"(the sigma of timestep {N - 1}), got {float(s64.max()):.6g}")
            times = self._sde.inv_int_beta(torch.log1p(s64**2)).clamp(max=1.0)
        if len(times) > 1 and not bool((times[1:] <= times[:-1]).all()):
            i = int(torch.nonzero(times[1:] > times[:-1])[0])
            what = "timesteps" if from_knots else "sigmas"
            got = (int(ts[i]), int(ts[i + 1])) if from_knots else (float(sig[i]), float(sig[i + 1]))
            raise ValueError(f"the knots must be strictly decreasing (a repeated one is a step of length 0): "
                             f"{what}[{i}] = {got[0]:g} and {what}[{i + 1}] = {got[1]:g}")
        if len(times) > 1 and bool((times == times[0]).all()):  # every step of length 0: the noise comes back
            what = (f"timesteps (all {int(ts[0])})" if from_knots else f"sigmas (all {float(sig[0]):g})")
            why = ("" if timesteps is not None or sigmas is not None else
                   f" (timestep_spacing={self.config.timestep_spacing!r} with {len(ts)} steps, as "
                   "DPMSolverMultistepScheduler chooses them); use fewer steps or timestep_spacing="
                   "'trailing' / 'linspace'")
            raise ValueError(f"{len(ts)} equal {what}: no step would move the sample{why}")
        # A repeated knot (many steps on few train timesteps, as DPM-Solver's spacing gives) is a
        # step of length 0: the identity, with the model output left out of the history (diffusers'
        # multistep schedulers divide by that length 0 there and return NaN).
        # Python bools and ints, so that step branches on no tensor (no torch.compile graph break)
        zero = torch.zeros(len(times), dtype=torch.bool)
        zero[:-1] = times[1:] == times[:-1]
        self._zero = zero.tolist()
        self._rows = (torch.cumsum(~zero, 0) - (~zero).long()).tolist()  # kept knots before each step
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(np.ascontiguousarray(ts)).to(device=device, dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([np.asarray(sig, dtype=np.float64), [final]]).astype(np.float32))
        self._times = times
        self._from_knots = from_knots
        # the final sigma is 0 or sigma_min, the sigma of timestep 0: its knot time is exactly 1/N
        self._final_time = None if final == 0 else 1.0 / N
        s64 = torch.as_tensor(sig, dtype=_F64)
        if from_knots:  # the process's own ᾱ at those knots (it differs from the float32 one where
            # that one is 0, or not decreasing: the 2^-24 end of a zero-terminal-SNR schedule)
            ac = self._ac64[torch.as_tensor(ts, dtype=torch.int64)]
            s64 = ((1 - ac) / ac).sqrt()
        a = 1 / torch.sqrt(1 + s64 * s64)
        self._alpha_sigma = (a, s64 * a)  # VP α and σ at each model time
        self._step_index = None
        self._begin_index = None
        self._hist = []
        self._build(0, device)

    def _table_on(self, times, method, **options):
        """The Table of ``method`` from the knot times ``times`` to the final sigma, or None when
        the only knot is already the final one (the step is then the identity)."""
        if self._final_time is None and getattr(self.config, "final_step", "x0") == "multistep":
            # the last step integrated like the others, to sigma = FINAL_SIGMA (~0), no model call there
            t_f = float(self._sde.inv_int_beta(torch.tensor(math.log1p(FINAL_SIGMA**2), dtype=_F64)))
            return make_table(self._sde, method, torch.cat([times, torch.tensor([t_f], dtype=_F64)]), **options)
        if self._final_time is None:  # to sigma = 0: the x0 (Tweedie) row
            return make_table(self._sde, method, times, denoise=True, **options)
        if self._final_time < float(times[-1]):
            times = torch.cat([times, torch.tensor([self._final_time], dtype=_F64)])
        # else the last knot is already the final one: its step is the identity (no row)
        return make_table(self._sde, method, times, **options) if len(times) > 1 else None

    def _knot_times(self, first):
        """The distinct knot times from step ``first`` on (a repeated knot once)."""
        return self._times[first:][~torch.tensor(self._zero[first:], dtype=torch.bool)]

    def _build(self, first, device=None):
        """The table over the knots from step ``first`` on, and its device copies."""
        times = self._knot_times(first)
        self._table, self._row0 = self._table_on(times, self._method, **self._options(len(times))), first
        self._dev = {}
        if device is not None:
            self._device_state(torch.device(device))

    def _device_state(self, device, dtype=torch.float32):
        """(DeviceTable, α, σ) on ``device`` for samples of ``dtype`` (float32 coefficients; float64
        for float64 samples), copied once per (device, dtype)."""
        cdt = table_dtype(dtype)
        key = (str(device), cdt)
        if key not in self._dev:
            a, s = self._alpha_sigma
            self._dev[key] = (None if self._table is None else self._table.to(device, cdt),
                              a.to(device=device, dtype=cdt), s.to(device=device, dtype=cdt))
        return self._dev[key]

    # ---- per-method hooks ----------------------------------------------------------------
    _method = "ddim"

    def _options(self, n_steps):
        """The method options for a table with ``n_steps`` model times."""
        return {}

    # ---- stepping --------------------------------------------------------------------------
    def _apply(self, n, z, eps, device, noise=None, table=None):
        """Row n − row0 of the table (or of ``table``) on z, with eps pushed onto the history."""
        dt = self._device_state(device, z.dtype)[0] if table is None else table
        if self._zero[n]:  # a repeated knot: a step of length 0
            return z
        r = self._rows[n] - self._rows[self._row0]
        if dt is None or r >= len(dt.calls):  # the last knot is the final one: identity
            return z
        entry = dt.history_entry(r, z, eps)
        if dt.history > 1 and entry is eps:
            # kept for later steps: never the caller's model_output itself, which a pipeline may
            # overwrite in place (a static output buffer, a CUDA graph) before the next step
            entry = entry.clone()
        self._hist = [entry] + self._hist[: dt.history - 1]
        return dt.step(r, z, self._hist, noise=noise)

    def _split_learned(self, model_output, sample):
        """With a learned variance (config ``variance_type`` 'learned' / 'learned_range'), the first
        C channels of a 2C-channel model output (the prediction; the rest is the variance, which a
        deterministic update does not use), as DPM-Solver does; else ``model_output``."""
        if (self.config.get("variance_type") in _LEARNED and isinstance(model_output, torch.Tensor)
                and isinstance(sample, torch.Tensor) and model_output.ndim == sample.ndim >= 2
                and model_output.shape[1] == 2 * sample.shape[1]):
            return model_output[:, : sample.shape[1]]
        return model_output

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
        return eps.to(z.dtype), x0, z

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
        if self._config_error is not None:
            raise ValueError(self._config_error)
        ac = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        t = timesteps.to(like.device) if isinstance(timesteps, torch.Tensor) else torch.as_tensor(timesteps, device=like.device)
        N = ac.shape[0]
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers in [0, num_train_timesteps={N}), got dtype {t.dtype}")
        if bool(((t < 0) | (t >= N)).any()):  # a negative index would silently wrap around
            raise ValueError(f"timesteps must lie in [0, num_train_timesteps={N}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
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
    """diffusers' DDIMScheduler (same config, same timesteps, same results) with the update in
    fastint's fused op.

    ``eta > 0`` in ``step`` is stochastic DDIM (noise from ``generator`` as diffusers draws it,
    or ``variance_noise``). The step after ``timesteps[n]`` always goes to ``timesteps[n+1]``
    (diffusers goes to ``t - N // num_inference_steps``, the same for 'leading' and 'trailing'
    spacing), and the last to ᾱ = 1 (``set_alpha_to_one``) or to ᾱ_0. Like diffusers' DDIM,
    ``step`` is stateless: it reads its step from ``timestep`` (any order, any repetition), and an
    integer timestep that is not in the schedule is stepped with diffusers' formula, from ᾱ_t to
    ᾱ at ``t - N // num_inference_steps`` (outside the fused op).
    """

    _public_zero_snr_floor = False  # diffusers' DDIM keeps alphas_cumprod[-1] = 0 under zero-terminal SNR

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        self._setup()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._eta_tables = {}

    def _knots(self, num_inference_steps, timesteps, sigmas):
        """DDIM's own spacing (diffusers' DDIMScheduler.set_timesteps), or custom integer timesteps."""
        c = self.config
        N = c.num_train_timesteps
        if sigmas is not None:
            raise ValueError("DDIMScheduler.set_timesteps takes num_inference_steps or timesteps, not sigmas")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps needs exactly one of num_inference_steps and timesteps")
        final = 0.0 if c.set_alpha_to_one else float(((1 - self._ac64[0]) / self._ac64[0]).sqrt())
        if timesteps is not None:
            ts, _, _, _ = dpm_schedule(c, self.alphas_cumprod, timesteps=timesteps)
        else:
            n = num_inference_steps
            if not is_int(n):
                raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
            if not 1 <= n <= N:
                raise ValueError(f"num_inference_steps must lie in [1, num_train_timesteps={N}], got {n}")
            if c.timestep_spacing == "linspace":
                ts = np.linspace(0, N - 1, n).round()[::-1].copy().astype(np.int64)
            elif c.timestep_spacing == "leading":
                ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.int64) + int(c.steps_offset)
            else:
                ts = np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        if np.any(np.diff(ts) >= 0) or ts.min() < 0 or ts.max() >= N:
            raise ValueError(f"timesteps must be strictly decreasing in [0, {N}), got {ts.tolist()}")
        sig = ((1 - self._ac64[ts]) / self._ac64[ts]).sqrt().numpy()
        return ts, sig, final, True

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._eta_tables = {}
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas)
        ts = [int(k) for k in self.timesteps.tolist()]
        self._index_of = {k: i for i, k in enumerate(ts)}
        # DDIM steps from t to t − N // num_inference_steps (diffusers' rule); a row of the table
        # goes to the next timestep instead, so it serves only the knots where the two agree
        # (always with 'leading'; 'linspace' and 'trailing' can differ: those use _step_from_t).
        # Custom timesteps have no such rule: they are followed as given.
        gap = self.config.num_train_timesteps // self.num_inference_steps
        self._table_ok = [timesteps is not None or sigmas is not None
                          or (ts[i + 1] if i + 1 < len(ts) else -1) == k - gap or (i + 1 == len(ts) and k - gap < 0)
                          for i, k in enumerate(ts)]

    def _int_timestep(self, timestep):
        """``timestep`` as a Python int in [0, num_train_timesteps) (an int, or a one-element tensor)."""
        N = self.config.num_train_timesteps
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be one timestep, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real) or timestep != int(timestep) \
                or not 0 <= timestep < N:
            raise ValueError(f"timestep must be an integer in [0, num_train_timesteps={N}), got {timestep!r}")
        return int(timestep)

    def _step_from_t(self, model_output, t, sample, eta, use_clipped_model_output, noise):
        """diffusers' DDIM step from timestep ``t`` to ``t - N // num_inference_steps`` (a timestep
        that is not in the schedule: no row of the table holds it). Returns (prev, x̂0)."""
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        ac = self._ac64  # diffusers' ᾱ, except where the process floors it (zero terminal SNR: 2^-24, not 0)
        like = dict(device=sample.device, dtype=sample.dtype)
        a_t, a_p = ac[t].to(**like), (ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod).to(**like)
        a, s = a_t.sqrt(), (1 - a_t).sqrt()
        eps, x0, _ = self._eps_x0(model_output, sample, a, s)
        if x0 is None:
            x0 = (sample - s * eps) / a
        if use_clipped_model_output:
            eps = (sample - a * x0) / s
        std = eta * self._get_variance(t, prev_t).to(**like).sqrt()
        prev = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
        if noise is not None:
            prev = prev + std * noise
        return prev, x0

    def _eta_table(self, eta, device, dtype=torch.float32):
        """The sddim DeviceTable for ``eta`` (built on first use: eta is an argument of step)."""
        key = (eta, self._row0, str(device), table_dtype(dtype))
        if key not in self._eta_tables:
            tab = self._table_on(self._knot_times(self._row0), "sddim", eta=eta)
            self._eta_tables[key] = None if tab is None else tab.to(device, table_dtype(dtype))
        return self._eta_tables[key]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        """One DDIM step from ``timestep`` to the next timestep; returns (prev_sample, pred_original_sample)."""
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
        eta = float(eta)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass at most one of generator and variance_noise")
        model_output = self._split_learned(model_output, sample)
        self._check_step_args(model_output, sample)
        sample = _promoted(sample, model_output)
        t = self._int_timestep(timestep)
        n = self._index_of.get(t)
        noise = None
        if eta > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        if n is None or not self._table_ok[n]:  # not a knot, or diffusers' target is not the next knot:
            # diffusers' step from t itself, to t − N // num_inference_steps
            prev, x0 = self._step_from_t(model_output, t, sample, eta, use_clipped_model_output, noise)
            if n is not None:
                self._step_index = n + 1
                if n == self.num_inference_steps - 1:
                    _check_finite(prev, f"{type(self).__name__}.step")
            if not return_dict:
                return prev, x0
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
        if n < self._row0:  # before set_begin_index's start: the table over all the knots
            self._build(0, sample.device)
        _, al, sg = self._device_state(sample.device, sample.dtype)
        a, s = al[n], sg[n]
        eps, x0, z = self._eps_x0(model_output, sample, a, s)
        if x0 is None:
            x0 = (sample - s * eps) / a
        if use_clipped_model_output and z is not sample:
            eps, z = ((sample - a * x0) / s).to(sample.dtype), sample
        table = self._eta_table(eta, sample.device, sample.dtype) if eta > 0 else None
        self._hist = []  # DDIM reads only this step's output
        prev = self._apply(n, z, eps, sample.device, noise=noise, table=table)
        if n == self.num_inference_steps - 1:
            _check_finite(prev, f"{type(self).__name__}.step")
        self._step_index = n + 1
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class _MultistepScheduler(_FastintScheduler):
    """DPM-Solver's knots and a deterministic step (shared by LambdaDDIM and ConjugateMultistep)."""

    def _not_in_schedule(self, timestep, ts):
        """A first timestep that is not in the schedule is the last step, as diffusers'
        DPM-Solver and UniPC schedulers take it (with a warning here)."""
        logger.warning(f"{type(self).__name__}: timestep {timestep} is not in scheduler.timesteps; stepping from the "
                       "last knot (as diffusers' multistep schedulers do)")
        return len(ts) - 1

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """α x0 + σ_VP ε at the scheduler's own sigma, as DPMSolverMultistepScheduler.add_noise:
        ``sigmas[begin_index]`` before the first step, ``sigmas[step_index]`` after it, else the
        index of each timestep in the schedule (α = 1/√(1 + σ²), σ_VP = σ α). Before set_timesteps,
        and for a timestep that is not in the schedule, the forward process at that timestep
        (√ᾱ_t, √(1 − ᾱ_t); diffusers would take the last sigma)."""
        if self.sigmas is None:
            return super().add_noise(original_samples, noise, timesteps)
        like = original_samples
        t = timesteps if isinstance(timesteps, torch.Tensor) else torch.as_tensor(timesteps)
        t = t.to(like.device).reshape(-1)
        sigmas = self.sigmas.to(device=like.device, dtype=like.dtype)
        if self.begin_index is not None:
            idx = self.step_index if self.step_index is not None else self.begin_index
            sigma = sigmas[[idx] * t.shape[0]]
            off = None
        else:
            ts = self.timesteps.to(like.device)
            idx, off = [], []
            for k in t:
                hits = (ts == k).nonzero()
                idx.append(int(hits[1 if len(hits) > 1 else 0]) if len(hits) else 0)
                off.append(len(hits) == 0)
            sigma = sigmas[idx]
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = (1 / (sigma**2 + 1) ** 0.5).reshape(shape)
        s = sigma.reshape(shape) * a
        if off is not None and any(off):  # not in the schedule: ᾱ at the timestep itself
            a0, s0 = self._sqrt_ab(t, like)
            m = torch.tensor(off, device=like.device).reshape(shape)
            a, s = torch.where(m, a0, a), torch.where(m, s0, s)
        return a * original_samples + s * noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One step from ``timestep`` to the next knot (deterministic: ``generator`` is unused).
        With ``variance_type`` 'learned' / 'learned_range', a model output of 2C channels is split
        and its first C (the ε, x0 or v prediction) are used, as DPM-Solver does."""
        model_output = self._split_learned(model_output, sample)
        n = self._prepare(model_output, timestep, sample)
        sample = _promoted(sample, model_output)
        _, al, sg = self._device_state(sample.device, sample.dtype)
        eps, _, z = self._eps_x0(model_output, sample, al[n], sg[n])
        prev = self._apply(n, z, eps, sample.device)
        if n == self.num_inference_steps - 1:  # the last step: one host read, never a NaN passed on
            _check_finite(prev, f"{type(self).__name__}.step")
        self._step_index = n + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


_KNOT_DOC = """
    Knots (as diffusers' DPMSolverMultistepScheduler): ``timestep_spacing`` ('linspace',
    'leading', 'trailing'), ``steps_offset``, ``lambda_min_clipped``, one of
    ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` / ``use_lu_lambdas``,
    ``final_sigmas_type`` ('zero': the last step maps to x̂0, 'sigma_min': to ᾱ_0), or
    ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)``. ``variance_type``: a
    DDPM-style value is accepted (the update is deterministic); 'learned' / 'learned_range' split
    a 2C-channel model output, as DPM-Solver does. A first ``timestep`` that is not in the
    schedule steps from the last knot, with a warning (diffusers' multistep schedulers do so
    silently). The update uses the sigmas
    themselves (times of the discrete VP process with ᾱ = 1/(1 + σ²)); the model sees
    ``timesteps``.
"""


class LambdaDDIMScheduler(_MultistepScheduler):
    """fastint's lambda_ddim (conjugate integrator with B = lam·I in t = (k+1)/N) as a diffusers scheduler.

    ``lam=None`` takes the value tuned for VP at this number of steps (fastint.tuning) on the
    knots it was tuned for: timestep spacings that end at sigma 0 (``final_sigmas_type="zero"``)
    from a finite terminal SNR. On any other knots (Karras, exponential, beta or Lu sigmas,
    custom ``sigmas``, ``final_sigmas_type="sigma_min"``, ``rescale_betas_zero_snr``) ``lam=None``
    is 0, DDIM: the tuned value relies on the last step mapping to x̂0 and on a first α well
    above 0, and there it diverged on exact scores (docs/dropin.md, section 1, "Limitations").
    ``lam=0`` is DDIM.
    """ + _KNOT_DOC

    _method = "lambda_ddim"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, lam: float | None = None,
                 prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None):
        _check_choice("variance_type", variance_type, _VARIANCE_TYPES)
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, numbers.Real)
                                or not math.isfinite(lam)):
            raise ValueError(f"lam must be a finite float or None, got {lam!r}")
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._setup()

    @property
    def lam(self):
        """The λ in use: the config's, or the one tuned for the current number of steps on these
        knots (fastint.tuning.tuned_lambda_on_knots)."""
        c = self.config
        if c.lam is not None:
            return float(c.lam)
        on_timesteps = getattr(self, "_from_knots", not _sigma_schedules(c))  # False for sigma knots, custom sigmas too
        if c.final_sigmas_type != "zero" or c.rescale_betas_zero_snr or not on_timesteps:
            return 0.0  # not the knots it was tuned on (class docstring)
        return tuned_lambda_on_knots(self.num_inference_steps or 50)

    def _options(self, n_steps):
        return {"lam": self.lam, "b": "identity"}


_X0_LOGSNR_ERROR = ("predict='x0' with log-SNR interpolation (interp='logsnr', or 'auto' on Karras, exponential, "
                    "beta or Lu sigmas and custom sigmas) cannot integrate the last step to sigma = 0: use "
                    "final_step='x0', interp='t', or predict='eps'")


class ConjugateMultistepScheduler(_MultistepScheduler):
    """fastint's conj_ms (exponential multistep: ε Lagrange-interpolated through the last
    ``solver_order`` outputs, in t or in log-SNR) as a diffusers scheduler.

    ``solver_order`` (1, 2, 3): points of the interpolation; the first steps (and those after
    set_begin_index) use fewer. ``interp``: the variable ε is interpolated in: 't' (DEIS's tAB on
    VP), 'logsnr' (log σ, DEIS's logρ), 'sigma' (σ, DEIS's ρAB), or 'auto' (default): the
    variable the knots are spaced in, 't' for timestep spacings and 'logsnr' for sigma schedules
    (Karras, exponential, beta, Lu, custom sigmas).
    ``corrector=True`` (solver_order <= 2) adds conj_ms's Adams–Moulton corrector: each step
    also corrects the previous one with the newest output, at no extra model call (order
    solver_order + 1). ``lower_final``: below 15 steps, the last steps use no more points than
    steps are left (DPM-Solver's lower_order_final; a separate name, so that a DPM-Solver config's
    lower_order_final=True does not switch it on: it is reported as not implemented).
    ``final_step`` (with final_sigmas_type='zero'): 'multistep' integrates the last interval like
    the others, ε interpolated through the last outputs down to σ = 1e-5 (no extra model call);
    'x0' jumps from the last knot to the x̂0 prediction (DPM-Solver's last step). ``predict``:
    'eps' interpolates the ε outputs, 'x0' the data predictions x̂0 (DPM-Solver++'s frame).
    ``last_timestep`` (None: the config's spacing): fastint's own spacing, the last n of n + 1
    timesteps uniform from num_train_timesteps − 1 (or lambda_min_clipped's cut) down to this one,
    rounded: like 'leading', the pure-noise end is left out, and the knots end at last_timestep.
    It replaces timestep_spacing and steps_offset (custom timesteps / sigmas given to
    set_timesteps still win) and cannot be combined with a sigma schedule (use_karras_sigmas, ...).
    With final_step='x0' the last step jumps from there to x̂0: a model that denoises poorly near
    t = 0 is never asked there. Measured from 5 steps up: with fewer, the first model call lies
    far below the pure-noise end (at 4 steps timestep 774 of 999 with last_timestep=99; at 1 step
    last_timestep itself, on the initial noise). ``order3_below`` (0: never): with fewer inference steps than this,
    solver_order=3 without the corrector replaces solver_order and corrector (the registry's
    conj_ms option k3_below): on the shipped VP model the third-order predictor is ahead up to
    10 steps and 0.3–4 % behind from 12 on (docs/dropin.md, "Order by step count"). The recommended drop-in for learned models is
    ``predict='x0', interp='logsnr', final_step='x0', corrector=True, last_timestep=99,
    order3_below=11`` (fastint.demo.RECOMMENDED_DROPIN; docs/dropin.md, "Ahead of the peers").

    Defaults (solver_order=2, interp='auto', corrector=False, lower_final=False,
    final_step='multistep'): the configuration measured best on the shipped digits model and the
    exact-score mixtures together (docs/results.md, "Drop-in schedulers"). The corrector and
    interp='logsnr' are more accurate on exact scores from 20 steps on, but the corrector blows up
    on the learned model at 5 steps (FD 33 against 0.56). At 10–20 steps on learned models,
    ``predict='x0', interp='logsnr', final_step='x0'`` (the peers' frame and last step) comes
    within 4.3 % of DPM-Solver++'s and UniPC's Fréchet distance, which rewards that last step
    more than accuracy (docs/results.md, "Better-trained models"); it gives up the defaults'
    lead at 5 steps.
    """ + _KNOT_DOC

    _method = "conj_ms"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False, corrector: bool = False,
                 interp: str = "auto", lower_final: bool = False, final_step: str = "multistep", predict: str = "eps", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_lu_lambdas: bool = False, lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, last_timestep: int | None = None, order3_below: int = 0):
        _check_choice("variance_type", variance_type, _VARIANCE_TYPES)
        if not is_int(order3_below) or order3_below < 0:
            raise ValueError(f"order3_below must be an int >= 0 (0: never), got {order3_below!r}")
        if last_timestep is not None:
            if (not is_int(last_timestep)
                    or not 0 <= last_timestep < num_train_timesteps - 1):
                raise ValueError(f"last_timestep must be None or an int in [0, num_train_timesteps - 1 = "
                                 f"{num_train_timesteps - 1}), got {last_timestep!r}")
            kinds = _sigma_schedules(locals())
            if kinds:
                raise ValueError(f"last_timestep sets the knots itself: it cannot be combined with {kinds[0]}=True "
                                 f"(pass {kinds[0]}=False with it to from_config, or leave last_timestep out "
                                 "to keep the config's sigmas)")
        if solver_order not in (1, 2, 3) or not isinstance(solver_order, int) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if not isinstance(corrector, bool):
            raise TypeError(f"corrector must be a bool, got {type(corrector).__name__}")
        if not isinstance(lower_final, bool):
            raise TypeError(f"lower_final must be a bool, got {type(lower_final).__name__}")
        if corrector and solver_order == 3:
            raise ValueError("corrector=True needs solver_order <= 2 (the correction reads solver_order + 1 "
                             "outputs; a row holds 3)")
        _check_choice("interp", interp, ("auto", "t", "logsnr", "sigma"))
        _check_choice("final_step", final_step, ("x0", "multistep"))
        _check_choice("predict", predict, ("eps", "x0"))
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if (predict == "x0" and final_step == "multistep" and final_sigmas_type == "zero"
                and (interp == "logsnr" or (interp == "auto" and _sigma_schedules(locals())))):
            # known here from the config alone (interp='auto' is log-SNR on sigma schedules): refused
            # now rather than in the pipeline's set_timesteps (_options)
            raise ValueError(_X0_LOGSNR_ERROR)
        self._setup()

    def _options(self, n_steps):
        c = self.config
        # the corrector is not carried into the x0 row (measured: order 2.4 with it, 3.1 without,
        # on DDPM knots ending at timestep 0; tests/test_diffusers.py::test_observed_orders)
        corr = ("inner" if c.final_step == "x0" else "every") if c.corrector else "none"
        interp = c.interp
        if interp == "auto":  # the variable the knots are spaced in: t for timestep spacings, log σ for sigma schedules
            interp = "t" if self._from_knots else "logsnr"
        if c.predict == "x0" and interp == "logsnr" and c.final_step == "multistep" and self._final_time is None:
            # the last step would extrapolate x̂0 in λ = −log σ out to λ ≈ 11.5 (σ = 1e-5), weighted by
            # e^λ: measured 6–28x the DPM-Solver++ error (docs/results.md)
            raise ValueError(_X0_LOGSNR_ERROR)
        k = int(c.solver_order)
        if self.num_inference_steps < c.order3_below:  # conj_ms's k3_below, on the whole run's count (not n_steps: set_begin_index)
            k, corr = 3, "none"
        return {"k": k, "corrector": corr, "interp": interp,
                "lower_final": bool(c.lower_final and n_steps < 15), "predict": c.predict}


# --------------------------------------------------------------------------- flow matching
_FLOW_KEYS = tuple(FLOWMATCH_DEFAULTS)


class FlowMatchConjugateScheduler(_StepState, SchedulerMixin, ConfigMixin):
    """fastint's conjugate multistep on the flow path x_σ = (1 − σ) x0 + σ ε, as a drop-in for
    diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Wan, ... pipelines)::

        pipe.scheduler = FlowMatchConjugateScheduler.from_config(pipe.scheduler.config)

    Sigmas and timesteps are exactly FlowMatchEulerDiscreteScheduler's for the same config and
    ``set_timesteps`` arguments (``shift``, ``use_dynamic_shifting`` with ``mu``,
    ``time_shift_type``, ``shift_terminal``, Karras / exponential / beta sigmas,
    ``invert_sigmas``, custom ``sigmas`` / ``timesteps``; fastint.flow_schedule). A trailing 0 in
    custom ``sigmas`` is the final sigma: Euler's step at it has length 0, here it is the identity.
    The model predicts the velocity v = ε − x0; each step stores x̂0 = x − σ v and applies one row of a
    fastint table (fastint.flow.flow_table) with the fused op. ``set_timesteps`` builds the
    whole table.

    Method options:
        solver_order (1, 2, 3): data predictions x̂0 the interpolation goes through (1 without
            the corrector: Euler, identical to FlowMatchEulerDiscreteScheduler); the first steps
            use fewer.
        interp: the variable x̂0 is interpolated in: 'sigma2' (σ²: along the ODE x̂0 = x(0) +
            O(σ²), so this variable is the flat one near the data; docs/integrators.md §8),
            'sigma' (σ), 'index' (the step index) or 'logsnr' (λ = log((1 − σ)/σ), DPM-Solver++'s).
        corrector: the Adams–Moulton correction of each step by the next output, carried by the
            next row and by the last (x0) row (order + 1, no extra call); with solver_order=3,
            of the first step only (its Euler start would otherwise cap the order at 2).
        lower_final: the last steps use no more points than steps are left.
        final_step: 'x0' (default): the last step maps σ_{n−1} to x̂0 (σ = 0), as Euler does;
            'multistep': the last interval is integrated like the others, to σ = 1e-5.

    Defaults (solver_order=2, interp='sigma2', corrector=True, final_step='x0'): the setting
    measured best over the exact-velocity mixtures and the learned digits model together
    (docs/results.md, "Flow matching"). ``stochastic_sampling``
    and the step arguments ``s_churn`` / ``per_token_timesteps`` are not implemented and raise.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config filtering, plus: a DDPM-style config (ε / v / x0 prediction) raises;
        a UniPC / DPM-Solver config with flow sigmas (Wan) maps ``flow_shift`` to ``shift``; keys
        this class does not implement are named in one warning."""
        merged = {**config_dict, **kwargs}
        pred = merged.get("prediction_type")
        if pred is not None and pred != "flow_prediction":
            raise ValueError(f"{cls.__name__} is for flow-matching models; this config has prediction_type={pred!r} "
                             "(a DDPM-style model): use ConjugateMultistepScheduler")
        if merged.get("use_flow_sigmas") and "flow_shift" in merged and "shift" not in merged:
            config_dict = {**config_dict, "shift": float(merged["flow_shift"])}
        init, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        cls._warn_ignored(init, hidden, skip=("prediction_type", "use_flow_sigmas", "flow_shift"), kwargs=kwargs)
        return init, unused, hidden

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15,
                 base_image_seq_len: int | None = 256, max_image_seq_len: int | None = 4096,
                 invert_sigmas: bool = False, shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False, solver_order: int = 2,
                 interp: str = "sigma2", corrector: bool = True, lower_final: bool = False, final_step: str = "x0"):
        if solver_order not in (1, 2, 3) or not isinstance(solver_order, int) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        for name, value in (("corrector", corrector), ("lower_final", lower_final)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        _check_choice("interp", interp, FLOW_INTERP)
        _check_choice("final_step", final_step, ("x0", "multistep"))
        if stochastic_sampling:
            raise ValueError("FlowMatchConjugateScheduler is deterministic: stochastic_sampling=True is not "
                             "implemented (keep FlowMatchEulerDiscreteScheduler for it)")
        self._shift = float(shift)
        lo, hi = flowmatch_training_sigmas(self._flow_config())  # also validates the config
        self.sigma_min, self.sigma_max = lo, hi
        N = num_train_timesteps
        train = torch.from_numpy(np.linspace(1, N, N, dtype=np.float32)[::-1].copy()) / N
        if not use_dynamic_shifting:
            train = self._shift * train / (1 + (self._shift - 1) * train)
        self.timesteps = train * N
        self.sigmas = train
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._table = None
        self._step_index = None
        self._begin_index = None
        self._row0 = 0
        self._hist = []
        self._dev = {}

    def _flow_config(self):
        return {k: self.config[k] for k in _FLOW_KEYS}

    @property
    def shift(self):
        """The shift of the next set_timesteps (the config's, or set_shift's)."""
        return self._shift

    def set_shift(self, shift: float):
        """Use ``shift`` from the next set_timesteps on (as FlowMatchEulerDiscreteScheduler)."""
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a finite float > 0, got {shift!r}")
        self._shift = float(shift)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """Identity: flow models take the sample unscaled."""
        return sample

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        """The dynamic shift of t at ``mu`` (FlowMatchEulerDiscreteScheduler.time_shift; sigma = 1)."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    # ---- schedule and table ----------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """FlowMatchEulerDiscreteScheduler's sigmas and timesteps for these arguments, and the
        whole coefficient table on them."""
        sig64, ts = flowmatch_schedule(self._flow_config(), num_inference_steps, sigmas=sigmas, mu=mu,
                                       timesteps=timesteps, shift=self._shift)
        # the noise level of each knot: with invert_sigmas the schedule runs in 1 − σ (and the
        # Euler update x + (σ' − σ) out is x − (s' − s) out: the velocity in s is −out)
        levels = 1 - sig64 if self.config.invert_sigmas else sig64
        model = levels[:-1]
        # a custom schedule ending in 0 (sigmas=[..., 0.0]): Euler keeps the 0 as a last step of
        # length 0; here 0 is the final sigma and that last step is the identity
        zero_last = len(model) > 1 and float(model[-1]) == 0.0
        kept = model[:-1] if zero_last else model
        if bool((kept <= 0).any()) or bool((kept > 1).any()) or bool((kept[1:] >= kept[:-1]).any()):
            raise ValueError("the model sigmas must be strictly decreasing noise levels in (0, 1], then "
                             f"optionally a final 0 (got {model.tolist()})")
        self.num_inference_steps = len(ts)
        self.timesteps = ts.to(device=device)
        self.sigmas = sig64.to(dtype=torch.float32, device=device)
        self._levels = kept
        self._step_index = None
        self._begin_index = None
        self._build(0, device)

    def _options(self):
        c = self.config
        if c.solver_order == 1 and not c.corrector:
            return "euler", {}
        # the last correction is carried into the x0 row too (measured better than "inner" on every
        # problem of bench/study_flow.py)
        # (solver_order 3: only the first step is corrected, which restores order 3 after its
        # Euler start; a correction of every step would read 4 outputs, and a row holds 3)
        corr = ("every" if c.solver_order <= 2 else "start") if c.corrector else "none"
        return "conj_ms", {"k": int(c.solver_order), "corrector": corr, "interp": c.interp,
                           "lower_final": bool(c.lower_final)}

    def _build(self, first, device=None):
        levels = self._levels[first:]
        method, opts = self._options()
        if len(levels) == 0:  # starting at the trailing sigma 0: nothing left to integrate
            self._table = None
        elif self.config.final_step == "multistep":
            knots = torch.cat([levels, torch.tensor([FINAL_SIGMA], dtype=_F64)])
            self._table = flow_table(knots, method, **opts)
        else:
            self._table = flow_table(levels, method, denoise=True, **opts)
        self._row0 = first
        self._hist = []
        self._dev = {}
        if device is not None:
            self._device_state(torch.device(device))

    def _device_state(self, device, dtype=torch.float32):
        """(DeviceTable, model sigmas) on ``device`` for samples of ``dtype`` (float32; float64 for
        float64 samples), copied once per (device, dtype)."""
        cdt = table_dtype(dtype)
        key = (str(device), cdt)
        if key not in self._dev:
            self._dev[key] = (None if self._table is None else self._table.to(device, cdt),
                              self._levels.to(device=device, dtype=cdt))
        return self._dev[key]

    # ---- stepping ------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True):
        """One step from ``timestep`` to the next sigma with the model's velocity ``model_output``
        (deterministic: ``generator`` and s_tmin / s_tmax / s_noise are unused; s_churn > 0 and
        per_token_timesteps are not implemented)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("step takes one of scheduler.timesteps (a float), not an integer index")
        if s_churn != 0.0 or per_token_timesteps is not None:
            raise ValueError("FlowMatchConjugateScheduler.step does not implement s_churn or per_token_timesteps")
        n = self._prepare(model_output, timestep, sample, batch=False)
        if n >= len(self._levels):  # the step at a trailing sigma 0: the identity (Euler's step of length 0)
            prev = _check_finite(sample.to(model_output.dtype), f"{type(self).__name__}.step")
            self._step_index = n + 1
            return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
        dt, levels = self._device_state(sample.device, sample.dtype)
        work = table_dtype(sample.dtype)  # float32 arithmetic; float64 samples in float64
        flat = sample.ndim == 1  # the fused op takes [B, C, ...]: a 1-D sample is one row
        z = (sample[None] if flat else sample).to(work)
        v = (model_output[None] if flat else model_output).to(work)
        if self.config.invert_sigmas:
            v = -v
        r = n - self._row0
        x0 = z - levels[n] * v
        self._hist = [x0] + self._hist[: dt.history - 1]
        prev = dt.step(r, z, self._hist).to(model_output.dtype)
        prev = prev[0] if flat else prev
        if n == self.num_inference_steps - 1:
            _check_finite(prev, f"{type(self).__name__}.step")
        self._step_index = n + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The forward process σ·noise + (1 − σ)·sample at ``timestep`` (img2img), as
        FlowMatchEulerDiscreteScheduler.scale_noise."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        ts = self.timesteps.to(sample.device)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, ts) for t in timestep]
        elif self.step_index is not None:
            idx = [self.step_index] * timestep.shape[0]
        else:
            idx = [self.begin_index] * timestep.shape[0]
        sigma = sigmas[idx].flatten()
        while sigma.ndim < sample.ndim:
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def __len__(self):
        return self.config.num_train_timesteps
