"""Flow-matching sigma/timestep schedules, bit-for-bit as diffusers' FlowMatchEulerDiscreteScheduler.

``flowmatch_schedule(config, ...)`` returns what ``FlowMatchEulerDiscreteScheduler(**config)``
stores in ``.sigmas`` / ``.timesteps`` after ``set_timesteps(...)`` (diffusers 0.42), without
importing diffusers. It needs only numpy and torch (scipy for ``use_beta_sigmas``).

How diffusers builds the schedule, and hence what is reproduced here, step by step:

1. At construction, the training sigmas are ``k / N`` for k = N..1 in float32 (N =
   ``num_train_timesteps``), shifted by the *config* ``shift`` as ``s*x / (1 + (s-1)*x)`` in
   float32 unless ``use_dynamic_shifting``. Their first and last entries are ``sigma_max`` and
   ``sigma_min`` (``flowmatch_training_sigmas``). ``set_shift`` later changes the shift used in
   step 3 but not this range, so a shifted config shifts the default grid twice.
2. Base sigmas: custom ``sigmas`` (cast to float32); else custom ``timesteps`` / N (float32);
   else ``linspace(sigma_max*N, sigma_min*N, n) / N`` in float64.
3. Shift: ``exp(mu) / (exp(mu) + (1/x - 1))`` ("exponential") or ``mu / (mu + (1/x - 1))``
   ("linear") with dynamic shifting, else the static shift of step 1 with the current shift.
4. Optional ``shift_terminal`` stretch: ``1 - (1 - x) / ((1 - x[-1]) / (1 - shift_terminal))``.
5. Optional Karras / exponential / beta respacing between the first and last sigma (float64).
6. Cast to float32; timesteps = custom timesteps if given, else sigmas * N (float32);
   ``invert_sigmas`` replaces sigmas by ``1 - sigmas`` (and timesteps by those times N); a
   terminal 0 (1 when inverted) is appended.

The numpy/torch expressions keep diffusers' operand order and dtypes (float32 where it works in
float32, float64 where it works in float64) so that rounding is identical; tests compare with
``torch.equal`` against diffusers itself (tests/test_flow_timesteps.py).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch

from .checks import is_int

__all__ = ["FLOWMATCH_DEFAULTS", "flowmatch_schedule", "flowmatch_training_sigmas", "flowmatch_mu"]

# FlowMatchEulerDiscreteScheduler.__init__ defaults (diffusers 0.42.1).
FLOWMATCH_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
_RESPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


# --------------------------------------------------------------------------- validation
def _finite_float(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _config(config):
    """The config with defaults filled in and checked; keys starting with '_' are ignored."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping of FlowMatchEulerDiscreteScheduler config keys, "
                         f"got {type(config).__name__}")
    unknown = sorted(k for k in config if not str(k).startswith("_") and k not in FLOWMATCH_DEFAULTS)
    if unknown:
        raise ValueError(f"config: unknown FlowMatchEulerDiscreteScheduler keys {unknown}")
    c = dict(FLOWMATCH_DEFAULTS)
    c.update({k: v for k, v in config.items() if k in FLOWMATCH_DEFAULTS})

    if not is_int(c["num_train_timesteps"]) or c["num_train_timesteps"] < 1:
        raise ValueError(f"config num_train_timesteps must be an int >= 1, got {c['num_train_timesteps']!r}")
    c["num_train_timesteps"] = int(c["num_train_timesteps"])
    c["shift"] = _finite_float("config shift", c["shift"])
    if c["shift"] <= 0:
        raise ValueError(f"config shift must be > 0, got {c['shift']}")
    on = [k for k in _RESPACINGS if c[k]]
    if len(on) > 1:
        raise ValueError(f"config: only one of {list(_RESPACINGS)} can be True, got {on}")
    if c["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"config time_shift_type must be 'exponential' or 'linear', got {c['time_shift_type']!r}")
    st = c["shift_terminal"]
    if st:  # diffusers applies it when truthy; None / 0 disable it
        st = _finite_float("config shift_terminal", st)
        if not 0.0 < st < 1.0:
            raise ValueError(f"config shift_terminal must lie in (0, 1) (or be None), got {st}")
        c["shift_terminal"] = st
    else:
        c["shift_terminal"] = None
    return c


def _sequence(name, values):
    """A custom sigmas/timesteps argument as a 1-D finite float32 numpy array (diffusers' cast)."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name} must be a sequence of floats, got {type(values).__name__}")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.array(values).astype(np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of floats ({e})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


# --------------------------------------------------------------------------- pieces
def flowmatch_training_sigmas(config, shift=None):
    """(sigma_min, sigma_max) as FlowMatchEulerDiscreteScheduler.__init__ computes them.

    Args:
        config: mapping of FlowMatchEulerDiscreteScheduler config keys (missing keys: defaults).
        shift: construction-time shift; defaults to ``config["shift"]``. Ignored (no shift at
            construction) when ``use_dynamic_shifting`` is set.

    Returns python floats holding float32 values: the last and first of the float32 training
    sigmas ``k/N`` (k = N..1), shifted by ``shift`` unless dynamic shifting is on.
    """
    c = _config(config)
    s = c["shift"] if shift is None else _finite_float("shift", shift)
    if s <= 0:
        raise ValueError(f"shift must be > 0, got {s}")
    n_train = c["num_train_timesteps"]
    ks = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()
    x = torch.from_numpy(ks) / n_train  # float32
    if not c["use_dynamic_shifting"]:
        x = s * x / (1 + (s - 1) * x)
    return x[-1].item(), x[0].item()


def flowmatch_mu(config, image_seq_len):
    """Resolution-dependent ``mu`` for dynamic shifting, as diffusers' pipelines compute it.

    Args:
        config: mapping with ``base_shift``, ``max_shift``, ``base_image_seq_len``,
            ``max_image_seq_len`` (missing keys: defaults 0.5, 1.15, 256, 4096).
        image_seq_len: number of latent tokens of the image (an int > 0).

    Same formula as ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``: mu is linear in
    ``image_seq_len``, equal to ``base_shift`` at ``base_image_seq_len`` and to ``max_shift`` at
    ``max_image_seq_len``.
    """
    c = _config(config)
    if not is_int(image_seq_len) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an int >= 1, got {image_seq_len!r}")
    lo_len, hi_len = c["base_image_seq_len"], c["max_image_seq_len"]
    lo_mu = _finite_float("config base_shift", c["base_shift"])
    hi_mu = _finite_float("config max_shift", c["max_shift"])
    if hi_len == lo_len:
        raise ValueError("config base_image_seq_len and max_image_seq_len must differ")
    slope = (hi_mu - lo_mu) / (hi_len - lo_len)
    offset = lo_mu - slope * lo_len
    return image_seq_len * slope + offset


def _respace(kind, x, n):
    """Karras / exponential / beta sigmas between x[0] and x[-1] (float64 numpy, n entries)."""
    from . import grids  # lazily: this module itself needs only numpy and torch

    hi, lo = x[0].item(), x[-1].item()
    if kind == "use_karras_sigmas":
        if lo < 0 or hi < 0:
            raise ValueError(f"use_karras_sigmas needs sigmas >= 0 at both ends, got {hi} and {lo}")
        return grids.karras_sigmas(hi, lo, n, rho=7.0)
    if kind == "use_exponential_sigmas":
        if lo <= 0 or hi <= 0:
            raise ValueError(f"use_exponential_sigmas needs sigmas > 0 at both ends, got {hi} and {lo}")
        return grids.exponential_sigmas(hi, lo, n)
    return grids.beta_sigmas(hi, lo, n, a=0.6, b=0.6)


# --------------------------------------------------------------------------- schedule
def flowmatch_schedule(config, num_inference_steps=None, sigmas=None, mu=None, timesteps=None, shift=None):
    """Sigmas and timesteps of FlowMatchEulerDiscreteScheduler.set_timesteps, exactly.

    Args:
        config: mapping of FlowMatchEulerDiscreteScheduler config keys (``num_train_timesteps``,
            ``shift``, ``use_dynamic_shifting``, ``base_shift``, ``max_shift``,
            ``base_image_seq_len``, ``max_image_seq_len``, ``invert_sigmas``, ``shift_terminal``,
            ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``,
            ``time_shift_type``, ``stochastic_sampling``); missing keys take diffusers' defaults,
            keys starting with ``_`` (e.g. ``_class_name``) are ignored, other unknown keys raise.
        num_inference_steps: number of steps n (int >= 1). Optional when ``sigmas`` or
            ``timesteps`` is given (then n is their length, and must equal it if passed).
        sigmas: custom sigmas, n values (cast to float32, then shifted/stretched/respaced as
            diffusers does); without the terminal sigma.
        mu: shift parameter, required iff ``use_dynamic_shifting`` (see ``flowmatch_mu``);
            ignored otherwise.
        timesteps: custom timesteps, n values (float32). Returned as given (unless
            ``invert_sigmas``); without ``sigmas`` they also define the sigmas as timesteps / N.
        shift: the shift in effect, as ``scheduler.set_shift(shift)`` sets it; defaults to
            ``config["shift"]``. The default grid's range still comes from the config shift.

    Returns ``(sigmas, timesteps)``: ``sigmas`` a float64 CPU tensor of length n + 1 holding
    exactly the float32 values of diffusers' ``scheduler.sigmas`` (terminal 0, or 1 with
    ``invert_sigmas``, included); ``timesteps`` a float32 CPU tensor of length n equal to
    ``scheduler.timesteps``. ``shift`` and ``mu`` are used as Python floats.

    Raises ValueError for the cases where diffusers raises (dynamic shifting without ``mu``,
    several respacings, bad ``time_shift_type``, mismatched lengths) and for bad input
    (``num_inference_steps`` not an int >= 1, none of n/sigmas/timesteps, empty or non-finite
    sigmas/timesteps, non-finite ``shift``/``mu``, ``shift_terminal`` outside (0, 1)).
    """
    c = _config(config)
    n_train = c["num_train_timesteps"]
    cur_shift = c["shift"] if shift is None else _finite_float("shift", shift)
    if cur_shift <= 0:
        raise ValueError(f"shift must be > 0, got {cur_shift}")
    if c["use_dynamic_shifting"]:
        if mu is None:
            raise ValueError("mu must be passed when config use_dynamic_shifting is True")
        mu = _finite_float("mu", mu)

    if num_inference_steps is not None and (not is_int(num_inference_steps) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    custom_sigmas = None if sigmas is None else _sequence("sigmas", sigmas)
    custom_times = None if timesteps is None else _sequence("timesteps", timesteps)
    if custom_sigmas is not None and custom_times is not None and custom_sigmas.size != custom_times.size:
        raise ValueError(f"sigmas and timesteps must have the same length, got {custom_sigmas.size} "
                         f"and {custom_times.size}")
    given = custom_sigmas if custom_sigmas is not None else custom_times
    if num_inference_steps is None:
        if given is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        n = int(given.size)
    else:
        n = int(num_inference_steps)
        if given is not None and given.size != n:
            raise ValueError(f"sigmas / timesteps must have num_inference_steps = {n} entries, got {given.size}")

    # Step 2: base sigmas (float32 when custom, float64 for the default linspace grid).
    if custom_sigmas is not None:
        x = custom_sigmas
    elif custom_times is not None:
        x = custom_times / n_train
    else:
        sig_min, sig_max = flowmatch_training_sigmas(c)
        x = np.linspace(sig_max * n_train, sig_min * n_train, n) / n_train

    # Step 3: shift. 1/x is inf at x = 0, which the formulas map to 0 as diffusers does.
    with np.errstate(divide="ignore"):
        if c["use_dynamic_shifting"]:
            odds = (1 / x - 1) ** 1.0
            if c["time_shift_type"] == "exponential":
                e = math.exp(mu)
                x = e / (e + odds)
            else:
                x = mu / (mu + odds)
        else:
            x = cur_shift * x / (1 + (cur_shift - 1) * x)

    # Step 4: stretch so that the last sigma is shift_terminal.
    if c["shift_terminal"] is not None:
        rest = 1 - x
        if not rest[-1] > 0:  # diffusers divides 0 by 0 here and returns NaN sigmas
            raise ValueError(f"config shift_terminal needs the last shifted sigma below 1, got {float(x[-1])} "
                             f"(with num_inference_steps=1 the only sigma is 1)")
        scale = rest[-1] / (1 - c["shift_terminal"])
        x = 1 - (rest / scale)

    # Step 5: respacing.
    kind = next((k for k in _RESPACINGS if c[k]), None)
    if kind is not None:
        x = _respace(kind, x, n)

    # Step 6: float32 storage, timesteps, inversion and the terminal sigma.
    sig32 = torch.from_numpy(np.asarray(x)).to(torch.float32)
    if custom_times is not None:
        t32 = torch.from_numpy(custom_times).to(torch.float32)
    else:
        t32 = sig32 * n_train
    if c["invert_sigmas"]:
        sig32 = 1.0 - sig32
        t32 = sig32 * n_train
        end = torch.ones(1, dtype=torch.float32)
    else:
        end = torch.zeros(1, dtype=torch.float32)
    sig32 = torch.cat([sig32, end])
    if not bool(torch.isfinite(sig32).all()):
        raise ValueError(f"the schedule has non-finite sigmas {sig32.tolist()} (check sigmas, mu, shift)")
    return sig32.to(torch.float64), t32
