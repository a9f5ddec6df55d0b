"""Red-team findings on fastint.diffusers, each pinned by a test: add_noise at the scheduler's own
sigmas, the non-finite error message, no graph break in the multistep step, unimplemented
from_config keyword arguments reported, and a trailing 0 in the flow class's custom sigmas."""
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastint.diffusers import (  # noqa: E402
    ConjugateMultistepScheduler,
    DDIMScheduler,
    FlowMatchConjugateScheduler,
    LambdaDDIMScheduler,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SIGMA_OPTIONS = [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "leading", "steps_offset": 1},
                 {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                 {"use_lu_lambdas": True}]


def _x(shape=(2, 3, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _noise_level(s, t, x0_shape=(1, 1, 1, 1)):
    """σ/√(1 + σ²) (the VP noise std) that add_noise applies at ``t``: x0 = 0, noise = 1."""
    return s.add_noise(torch.zeros(x0_shape), torch.ones(x0_shape), t).flatten()


# --------------------------------------------------------------------------- 1. add_noise
@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
@pytest.mark.parametrize("extra", SIGMA_OPTIONS, ids=lambda e: ",".join(e) or "default")
def test_add_noise_uses_the_schedule_sigmas_as_dpm_solver(cls, extra):
    """After set_timesteps, add_noise applies the scheduler's own sigmas (begin_index, then
    step_index, then the timestep's index), exactly as DPMSolverMultistepScheduler.add_noise."""
    ref = diffusers.DPMSolverMultistepScheduler(**SD, **extra)
    ours = cls.from_config(ref.config)
    n = 25
    for s in (ref, ours):
        s.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), rtol=1e-6, atol=0)
    want = ours.sigmas / (1 + ours.sigmas.double() ** 2).sqrt().float()
    x0, noise = _x(), _x(seed=1)
    # the lookup by timestep (no begin_index): each timestep of the schedule
    for i, t in enumerate(ours.timesteps):
        tt = t.reshape(1).repeat(2)
        torch.testing.assert_close(ours.add_noise(x0, noise, tt), ref.add_noise(x0, noise, tt), rtol=1e-6, atol=1e-6)
        j = ours.index_for_timestep(t)
        torch.testing.assert_close(_noise_level(ours, t.reshape(1)), want[j:j + 1], rtol=1e-6, atol=0)
    # begin_index (img2img), then step_index (inpainting, after each step)
    for s in (ref, ours):
        s.set_timesteps(n)
        s.set_begin_index(5)
    torch.testing.assert_close(_noise_level(ours, ours.timesteps[5:6]), want[5:6], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.add_noise(x0, noise, ours.timesteps[5:6].repeat(2)),
                               ref.add_noise(x0, noise, ref.timesteps[5:6].repeat(2)), rtol=1e-6, atol=1e-6)
    y = _x()
    for i in range(5, n):
        for s in (ref, ours):
            s.step(torch.zeros_like(y), s.timesteps[i], y)
        assert ours.step_index == ref.step_index == i + 1
        t = ours.timesteps[min(i + 1, n - 1)].reshape(1)
        torch.testing.assert_close(_noise_level(ours, t), want[i + 1:i + 2], rtol=1e-6, atol=0)
        torch.testing.assert_close(ours.add_noise(x0, noise, t.repeat(2)), ref.add_noise(x0, noise, t.repeat(2)),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
def test_add_noise_on_custom_sigmas_and_off_schedule_timesteps(cls):
    """Custom sigmas: add_noise applies them. A timestep that is not in the schedule (training
    noise, no begin_index) keeps the forward process at that timestep (ᾱ_t), as before
    set_timesteps."""
    s = cls(**SD)
    plain = _noise_level(s, torch.tensor([0, 321, 999]))
    torch.testing.assert_close(plain, (1 - s.alphas_cumprod[[0, 321, 999]]).sqrt(), rtol=1e-6, atol=0)
    sig = [14.0, 7.0, 3.0, 1.1, 0.3, 0.05, 0.0]
    s.set_timesteps(sigmas=sig)
    for i, t in enumerate(s.timesteps):
        want = sig[i] / (1 + sig[i] ** 2) ** 0.5
        torch.testing.assert_close(_noise_level(s, t.reshape(1)), torch.tensor([want]), rtol=1e-6, atol=0)
    off = [k for k in (0, 321, 999) if k not in s.timesteps.tolist()]
    assert off
    torch.testing.assert_close(_noise_level(s, torch.tensor(off)), (1 - s.alphas_cumprod[off]).sqrt(),
                               rtol=1e-6, atol=0)


def test_ddim_add_noise_stays_diffusers_ddim():
    """DDIMScheduler keeps DDIM's add_noise (ᾱ at the timestep), schedule or not."""
    ref, ours = diffusers.DDIMScheduler(**SD), DDIMScheduler(**SD)
    x0, noise = _x(), _x(seed=1)
    for s in (ref, ours):
        s.set_timesteps(10)
    t = ours.timesteps[[2, 7]]
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


# --------------------------------------------------------------------------- 2. non-finite message
@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler, DDIMScheduler,
                                 FlowMatchConjugateScheduler])
def test_non_finite_error_names_what_the_user_can_do(cls):
    s = cls()
    s.set_timesteps(4)
    y = _x()
    with pytest.raises(FloatingPointError) as err:
        for i, t in enumerate(s.timesteps):
            out = torch.zeros_like(y)
            if i == 1:
                out[0, 0, 0, 0] = float("nan")
            y = s.step(out, t, y).prev_sample
    msg = str(err.value)
    assert "check_finite" not in msg  # the schedulers have no such option
    assert f"{cls.__name__}.step" in msg and "NaN or Inf" in msg and "model" in msg


# --------------------------------------------------------------------------- 3. torch.compile
@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
@pytest.mark.parametrize("N", [1000, 6])  # N = 6: 6 steps on 6 train timesteps repeat knots ('linspace')
def test_multistep_step_has_no_graph_break(cls, N):
    import torch._dynamo as dynamo

    s = cls(num_train_timesteps=N)
    s.set_timesteps(6)
    x = _x((1, 4, 8, 8))
    ref = cls(num_train_timesteps=N)
    ref.set_timesteps(6)

    def body(out, t, y):
        return s.step(out, t, y, return_dict=False)[0]

    y = body(torch.tanh(x), s.timesteps[0], x)  # the first step (its lookup) eagerly
    dynamo.reset()
    expl = dynamo.explain(body)(torch.tanh(y), s.timesteps[1], y)
    assert expl.graph_break_count == 0 and expl.graph_count == 1, expl.break_reasons
    # results unchanged: an eager run on the same knots, continued from the traced step's state
    a = ref.step(torch.tanh(x), ref.timesteps[0], x).prev_sample
    b = ref.step(torch.tanh(a), ref.timesteps[1], a).prev_sample
    assert torch.equal(a, y) and s.step_index == ref.step_index == 2
    for t in ref.timesteps[2:]:
        c = s.step(torch.tanh(b), t, b).prev_sample
        b = ref.step(torch.tanh(b), t, b).prev_sample
        assert torch.equal(c, b)


# --------------------------------------------------------------------------- 4. from_config kwargs
def _ignored(caplog):
    return [r.getMessage() for r in caplog.records if "ignores config keys" in r.getMessage()]


def test_unimplemented_from_config_kwargs_are_warned(caplog):
    cfg = diffusers.DPMSolverMultistepScheduler().config
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = ConjugateMultistepScheduler.from_config(cfg, lower_order_final=True, euler_at_final=True, solver_ordr=3,
                                                    solver_order=3)
    msgs = _ignored(caplog)
    assert len(msgs) == 1, msgs
    assert all(k in msgs[0] for k in ("lower_order_final=True", "euler_at_final=True", "solver_ordr=3"))
    assert "solver_order=" not in msgs[0] and s.config.solver_order == 3
    # the same keys in the config dict: the same one warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ConjugateMultistepScheduler.from_config(
            diffusers.DPMSolverMultistepScheduler(lower_order_final=True, euler_at_final=True).config)
    msgs = _ignored(caplog)
    assert len(msgs) == 1 and "lower_order_final=True" in msgs[0] and "euler_at_final=True" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # implemented keyword arguments: nothing to report
        ConjugateMultistepScheduler.from_config(cfg, solver_order=3, corrector=False)
    assert not _ignored(caplog)


def test_unimplemented_flow_from_config_kwargs_are_warned(caplog):
    cfg = diffusers.FlowMatchEulerDiscreteScheduler().config
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        f = FlowMatchConjugateScheduler.from_config(cfg, shfit=3.0)
    msgs = _ignored(caplog)
    assert len(msgs) == 1 and "shfit=3.0" in msgs[0]
    assert f.config.shift == 1.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        f = FlowMatchConjugateScheduler.from_config(cfg, shift=3.0)
    assert not _ignored(caplog) and f.config.shift == 3.0


# --------------------------------------------------------------------------- 5. flow trailing 0
def _vel(x, t):
    return torch.tanh(x) - 0.3 * x + 0.001 * float(t)


def _floop(s, **kw):
    s.set_timesteps(**kw)
    y = _x()
    for t in s.timesteps:
        y = s.step(_vel(y, t), t, y, return_dict=False)[0]
    return y


@pytest.mark.parametrize("cfg", [{}, {"shift": 3.0}, {"invert_sigmas": True},
                                 {"use_dynamic_shifting": True}], ids=lambda c: ",".join(c) or "default")
def test_flow_custom_sigmas_with_a_trailing_zero(cfg):
    """sigmas=[1.0, 0.5, 0.0]: Euler's schedule (timesteps end at 0, sigmas at 0, 0); the step at
    σ = 0 is the identity, so the run equals the run on sigmas=[1.0, 0.5]."""
    kw = {"mu": 1.0} if cfg.get("use_dynamic_shifting") else {}
    euler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    e = _floop(euler, sigmas=[1.0, 0.5, 0.0], **kw)
    one = FlowMatchConjugateScheduler.from_config(euler.config, solver_order=1, corrector=False)
    f1 = _floop(one, sigmas=[1.0, 0.5, 0.0], **kw)
    assert torch.equal(one.sigmas, euler.sigmas) and torch.equal(one.timesteps, euler.timesteps)
    assert one.num_inference_steps == len(euler.timesteps) == 3
    torch.testing.assert_close(f1, e, rtol=0, atol=2e-6)
    for opts in ({}, {"final_step": "multistep"}, {"solver_order": 3}):
        g = FlowMatchConjugateScheduler.from_config(euler.config, **opts)
        with_zero = _floop(g, sigmas=[1.0, 0.5, 0.0], **kw)
        without = _floop(g, sigmas=[1.0, 0.5], **kw)
        assert torch.equal(with_zero, without)


def test_flow_trailing_zero_begin_index_and_errors():
    s = FlowMatchConjugateScheduler()
    s.set_timesteps(sigmas=[1.0, 0.6, 0.3, 0.0])
    s.set_begin_index(3)  # start at σ = 0: nothing left to integrate
    y = _x()
    assert torch.equal(s.step(_vel(y, 0.0), s.timesteps[3], y).prev_sample, y)
    s.set_timesteps(sigmas=[1.0, 0.6, 0.3, 0.0])
    s.set_begin_index(2)
    ref = FlowMatchConjugateScheduler()
    ref.set_timesteps(sigmas=[1.0, 0.6, 0.3])
    ref.set_begin_index(2)
    a = s.step(_vel(y, 300.0), s.timesteps[2], y).prev_sample
    assert torch.equal(s.step(_vel(a, 0.0), s.timesteps[3], a).prev_sample, a)
    assert torch.equal(a, ref.step(_vel(y, 300.0), ref.timesteps[2], y).prev_sample)
    for bad in ([1.0, 0.0, 0.5], [1.0, 0.5, 0.0, 0.0], [0.0]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            s.set_timesteps(sigmas=bad)
