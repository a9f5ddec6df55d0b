"""fastint.flow_schedule against diffusers' FlowMatchEulerDiscreteScheduler, bit for bit."""
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from fastint.flow_schedule import (  # noqa: E402
    FLOWMATCH_DEFAULTS,
    flowmatch_mu,
    flowmatch_schedule,
    flowmatch_training_sigmas,
)

STEPS = (1, 2, 3, 4, 7, 8, 10, 20, 28, 50, 100, 999)
FEW = (1, 2, 7, 28, 50)


def _reference(config, set_shift=None, **kw):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    if set_shift is not None:
        sched.set_shift(set_shift)
    with np.errstate(divide="ignore"), warnings.catch_warnings():  # 1/0 for a custom sigma 0; numpy
        warnings.simplefilter("ignore", DeprecationWarning)  # 2 __array__ notice for tensor sigmas
        sched.set_timesteps(**kw)
    return sched


def _check(config, set_shift=None, **kw):
    ref = _reference(config, set_shift=set_shift, **kw)
    sig, ts = flowmatch_schedule(config, shift=set_shift, **kw)
    assert sig.dtype == torch.float64 and ts.dtype == torch.float32
    assert ref.sigmas.dtype == torch.float32 and ref.timesteps.dtype == torch.float32
    # float64 holding float32 values exactly, equal to diffusers' float32 sigmas
    assert torch.equal(sig.to(torch.float32).to(torch.float64), sig)
    assert torch.equal(sig.to(torch.float32), ref.sigmas), (sig - ref.sigmas.double()).abs().max()
    assert torch.equal(ts, ref.timesteps), (ts - ref.timesteps).abs().max()


def _cases():
    cases = []
    for s in (1.0, 3.0, 0.5):
        for n in STEPS:
            cases.append(pytest.param({"shift": s}, None, {"num_inference_steps": n}, id=f"shift{s}-n{n}"))
    cases.append(pytest.param({"shift": 3.1}, None, {"num_inference_steps": 28}, id="shift3.1-n28"))
    cases.append(pytest.param({"shift": 7, "num_train_timesteps": 100}, None, {"num_inference_steps": 20},
                              id="intshift-ntrain100"))
    for tst in ("exponential", "linear"):
        for m in (0.5, 1.15, 2.0):
            for n in FEW:
                cases.append(pytest.param({"use_dynamic_shifting": True, "time_shift_type": tst}, None,
                                          {"num_inference_steps": n, "mu": m}, id=f"dyn-{tst}-mu{m}-n{n}"))
    for n in FEW[1:]:  # n = 1 with shift_terminal: diffusers returns NaN, we raise (test_errors)
        cases.append(pytest.param({"shift_terminal": 0.1}, None, {"num_inference_steps": n}, id=f"term-n{n}"))
        cases.append(pytest.param({"shift": 3.0, "shift_terminal": 0.02}, None, {"num_inference_steps": n},
                                  id=f"term-shift3-n{n}"))
        cases.append(pytest.param({"use_dynamic_shifting": True, "shift_terminal": 0.1}, None,
                                  {"num_inference_steps": n, "mu": 1.15}, id=f"term-dyn-n{n}"))
    for kind in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        for s in (1.0, 3.0):
            for n in (1, 2, 10, 28, 100):
                cases.append(pytest.param({kind: True, "shift": s}, None, {"num_inference_steps": n},
                                          id=f"{kind}-shift{s}-n{n}"))
        cases.append(pytest.param({kind: True, "use_dynamic_shifting": True}, None,
                                  {"num_inference_steps": 20, "mu": 1.15}, id=f"{kind}-dyn"))
        cases.append(pytest.param({kind: True, "shift_terminal": 0.05}, None, {"num_inference_steps": 20},
                                  id=f"{kind}-term"))
        cases.append(pytest.param({kind: True, "shift": 3.0}, None, {"sigmas": [1.0, 0.7, 0.4, 0.1]},
                                  id=f"{kind}-custom-sigmas"))
    for n in FEW:
        cases.append(pytest.param({"invert_sigmas": True}, None, {"num_inference_steps": n}, id=f"invert-n{n}"))
        cases.append(pytest.param({"invert_sigmas": True, "shift": 3.0}, None, {"num_inference_steps": n},
                                  id=f"invert-shift3-n{n}"))
    cases.append(pytest.param({"invert_sigmas": True}, None,
                              {"timesteps": [900.0, 500.0, 100.0]}, id="invert-custom-timesteps"))
    custom = [1.0, 0.8125, 0.6, 0.33, 0.1, 0.01]
    lin = list(np.linspace(1.0, 1 / 28, 28))  # the float64 list pipelines (Flux, SD3) pass
    for cfg, name in (({}, "plain"), ({"shift": 3.0}, "shift3"), ({"shift": 0.5}, "shift0.5"),
                      ({"shift_terminal": 0.1}, "term")):
        cases.append(pytest.param(cfg, None, {"sigmas": custom}, id=f"sigmas-{name}"))
        cases.append(pytest.param(cfg, None, {"sigmas": lin}, id=f"sigmas-linspace28-{name}"))
        cases.append(pytest.param(cfg, None, {"sigmas": custom, "num_inference_steps": 6}, id=f"sigmas-n-{name}"))
    for tst in ("exponential", "linear"):
        cases.append(pytest.param({"use_dynamic_shifting": True, "time_shift_type": tst}, None,
                                  {"sigmas": lin, "mu": 0.93}, id=f"sigmas-dyn-{tst}"))
        cases.append(pytest.param({"use_dynamic_shifting": True, "time_shift_type": tst}, None,
                                  {"sigmas": [1.0, 0.5, 0.0], "mu": 1.15}, id=f"sigmas-with-zero-dyn-{tst}"))
    cases.append(pytest.param({}, None, {"sigmas": torch.linspace(1, 0.05, 12)}, id="sigmas-tensor"))
    times = [999.0, 875.5, 700.0, 412.25, 100.0, 3.0]
    for cfg, name in (({}, "plain"), ({"shift": 3.0}, "shift3"), ({"shift_terminal": 0.1}, "term"),
                      ({"use_karras_sigmas": True}, "karras")):
        cases.append(pytest.param(cfg, None, {"timesteps": times}, id=f"timesteps-{name}"))
    cases.append(pytest.param({"use_dynamic_shifting": True}, None, {"timesteps": times, "mu": 1.5},
                              id="timesteps-dyn"))
    cases.append(pytest.param({"shift": 3.0}, None, {"timesteps": times, "sigmas": custom}, id="both"))
    cases.append(pytest.param({"shift": 3.0}, None, {"timesteps": times, "sigmas": custom, "num_inference_steps": 6},
                              id="both-n"))
    for cfg_shift, new in ((1.0, 3.0), (3.0, 1.0), (3.0, 5.0), (2.0, 0.5)):
        for n in (1, 10, 28):
            cases.append(pytest.param({"shift": cfg_shift}, new, {"num_inference_steps": n},
                                      id=f"set_shift{cfg_shift}to{new}-n{n}"))
    cases.append(pytest.param({"shift": 3.0}, 2.5, {"sigmas": custom}, id="set_shift-sigmas"))
    cases.append(pytest.param({"use_karras_sigmas": True, "shift": 2.0}, 4.0, {"num_inference_steps": 20},
                              id="set_shift-karras"))
    cases.append(pytest.param({"use_dynamic_shifting": True}, 3.0, {"num_inference_steps": 20, "mu": 1.0},
                              id="set_shift-ignored-by-dyn"))
    cases.append(pytest.param({"shift": 3.0, "stochastic_sampling": True, "base_shift": 0.3, "max_shift": 1.5,
                               "base_image_seq_len": 64, "max_image_seq_len": 1024}, None,
                              {"num_inference_steps": 10}, id="unused-keys"))
    return cases


@pytest.mark.parametrize("config,set_shift,kw", _cases())
def test_matches_diffusers(config, set_shift, kw):
    _check(config, set_shift=set_shift, **kw)


def test_full_diffusers_config_accepted():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    sched.set_timesteps(15)
    sig, ts = flowmatch_schedule(sched.config, 15)  # FrozenDict with _class_name etc.
    assert torch.equal(sig.float(), sched.sigmas) and torch.equal(ts, sched.timesteps)
    assert set(FLOWMATCH_DEFAULTS) == {k for k in sched.config if not k.startswith("_")}
    assert all(sched.config[k] == v for k, v in FLOWMATCH_DEFAULTS.items() if k not in ("shift", "use_karras_sigmas"))


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 0.5}, {"use_dynamic_shifting": True, "shift": 3.0},
                                    {"num_train_timesteps": 50, "shift": 2.0}])
def test_training_sigmas(config):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    assert flowmatch_training_sigmas(config) == (sched.sigma_min, sched.sigma_max)


def test_training_sigmas_shift_override():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert flowmatch_training_sigmas({}, shift=3.0) == (sched.sigma_min, sched.sigma_max)


def test_mu():
    # diffusers.pipelines.flux.pipeline_flux.calculate_shift is not imported here (it pulls in
    # transformers, several seconds); mu is linear in the sequence length through
    # (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    assert math.isclose(flowmatch_mu({}, 256), 0.5, rel_tol=0, abs_tol=1e-15)
    assert math.isclose(flowmatch_mu({}, 4096), 1.15, rel_tol=0, abs_tol=1e-15)
    assert math.isclose(flowmatch_mu({}, 1024), 0.5 + 0.65 * 768 / 3840, rel_tol=1e-15)
    cfg = {"base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 64, "max_image_seq_len": 1024}
    assert math.isclose(flowmatch_mu(cfg, 544), 0.9, rel_tol=1e-14)
    with pytest.raises(ValueError, match="image_seq_len"):
        flowmatch_mu({}, 0)


@pytest.mark.parametrize("config,kw,match", [
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 10}, "mu"),
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 10, "mu": float("nan")}, "mu"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, {"num_inference_steps": 10}, "only one"),
    ({"use_exponential_sigmas": True, "use_karras_sigmas": True}, {"num_inference_steps": 10}, "only one"),
    ({"time_shift_type": "cosine"}, {"num_inference_steps": 10}, "time_shift_type"),
    ({}, {"sigmas": [1.0, 0.5], "timesteps": [1000.0, 500.0, 10.0]}, "same length"),
    ({}, {"sigmas": [1.0, 0.5], "num_inference_steps": 3}, "num_inference_steps"),
    ({}, {"timesteps": [1000.0, 500.0], "num_inference_steps": 3}, "num_inference_steps"),
    ({}, {}, "num_inference_steps"),
    ({}, {"num_inference_steps": 0}, "num_inference_steps"),
    ({}, {"num_inference_steps": -3}, "num_inference_steps"),
    ({}, {"num_inference_steps": 2.0}, "num_inference_steps"),
    ({}, {"num_inference_steps": True}, "num_inference_steps"),
    ({}, {"sigmas": []}, "sigmas"),
    ({}, {"sigmas": [1.0, float("nan")]}, "sigmas"),
    ({}, {"sigmas": [1.0, float("inf")]}, "sigmas"),
    ({}, {"sigmas": [[1.0, 0.5]]}, "sigmas"),
    ({}, {"sigmas": "1.0"}, "sigmas"),
    ({}, {"timesteps": [1000.0, float("nan")]}, "timesteps"),
    ({}, {"num_inference_steps": 5, "shift": float("inf")}, "shift"),
    ({}, {"num_inference_steps": 5, "shift": 0.0}, "shift"),
    ({"shift": -1.0}, {"num_inference_steps": 5}, "shift"),
    ({"num_train_timesteps": 0}, {"num_inference_steps": 5}, "num_train_timesteps"),
    ({"shift_terminal": 1.0}, {"num_inference_steps": 5}, "shift_terminal"),
    ({"use_exponential_sigmas": True}, {"sigmas": [1.0, 0.5, 0.0]}, "use_exponential_sigmas"),
    ({"use_karras_sigmass": True}, {"num_inference_steps": 5}, "unknown"),
    ({"shift_terminal": 0.1}, {"num_inference_steps": 1}, "shift_terminal"),
    ({"shift_terminal": 0.1, "use_dynamic_shifting": True}, {"num_inference_steps": 1, "mu": 1.0}, "shift_terminal"),
    ({"shift_terminal": 0.1}, {"sigmas": [1.0]}, "shift_terminal"),
])
def test_errors(config, kw, match):
    with pytest.raises(ValueError, match=match):
        flowmatch_schedule(config, **kw)


def test_diffusers_raises_where_we_raise():
    """The diffusers-side counterparts of the error cases above that diffusers itself rejects."""
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cosine")
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, 500.0, 10.0])
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler().set_timesteps(3, sigmas=[1.0, 0.5])


def test_diffusers_nan_where_we_raise():
    """shift_terminal with a single step: diffusers stretches 0/0 and stores a NaN sigma."""
    sched = FlowMatchEulerDiscreteScheduler(shift_terminal=0.1)
    with np.errstate(invalid="ignore"):
        sched.set_timesteps(1)
    assert torch.isnan(sched.sigmas[0]) and sched.sigmas[1] == 0
