"""The pipeline contract of the diffusers schedulers, pinned after a red-team pass: the history
never holds the caller's model_output (pipelines may overwrite it in place), LambdaDDIM's tuned λ
only on the knots it was tuned for, degenerate 'leading' knots refused with a clear error, and the
refusals that the config alone decides raised by from_config, not later in set_timesteps."""
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastint.demo import RECOMMENDED_DROPIN  # noqa: E402
from fastint.diffusers import (  # noqa: E402
    ConjugateMultistepScheduler,
    FlowMatchConjugateScheduler,
    LambdaDDIMScheduler,
)
from fastint.tuning import tuned_lambda_on_knots  # noqa: E402

BASE = diffusers.DDPMScheduler().config
RESPACED = [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
            {"use_lu_lambdas": True}]


def _x(seed=0, shape=(2, 3, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _loop(s, n, model, x, reuse):
    """The standard loop; with ``reuse`` the model output lives in one buffer that is scribbled
    over right after each step (a static output buffer, a CUDA graph's output)."""
    s.set_timesteps(n)
    buf = torch.empty_like(x)
    for t in s.timesteps:
        out = model(x, t)
        if reuse:
            buf.copy_(out)
            out = buf
        x = s.step(out, t, x).prev_sample
        if reuse:
            buf.fill_(float("nan"))
    return x


# --------------------------------------------------------------------------- 1. no aliasing
@pytest.mark.parametrize("cls,opts", [
    (ConjugateMultistepScheduler, {}),
    (ConjugateMultistepScheduler, {"solver_order": 3}),
    (ConjugateMultistepScheduler, {"corrector": True}),
    (ConjugateMultistepScheduler, {"predict": "x0", "final_step": "x0"}),
    (ConjugateMultistepScheduler, {"prediction_type": "v_prediction"}),
    (ConjugateMultistepScheduler, dict(RECOMMENDED_DROPIN)),
    (LambdaDDIMScheduler, {}),
], ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(v) or "default")
def test_history_does_not_hold_the_callers_model_output(cls, opts):
    """A model output overwritten in place after step changes nothing later (diffusers'
    DPM-Solver++ and UniPC keep converted copies; the ε history used to keep the tensor itself)."""
    model = lambda x, t: 0.9 * x + 0.01 * float(t) / 1000  # noqa: E731
    fresh = _loop(cls.from_config(BASE, **opts), 6, model, _x(), reuse=False)
    reused = _loop(cls.from_config(BASE, **opts), 6, model, _x(), reuse=True)
    assert torch.isfinite(reused).all()
    assert torch.equal(fresh, reused)


def test_flow_history_does_not_hold_the_callers_model_output():
    model = lambda x, t: 0.5 * x - 0.2  # noqa: E731
    fresh = _loop(FlowMatchConjugateScheduler(), 6, model, _x(), reuse=False)
    reused = _loop(FlowMatchConjugateScheduler(), 6, model, _x(), reuse=True)
    assert torch.equal(fresh, reused)


# --------------------------------------------------------------------------- 2. LambdaDDIM's λ
def _point_mass_error(s, n, m=0.5):
    """max |x_end − m| for data at the point m with its exact ε: every exact sampler ends at m
    (at sigma_min it is off by sigma_min times the noise only)."""
    s.set_timesteps(n)
    ac = s.alphas_cumprod
    x = _x(shape=(1, 3, 8, 8))
    for t in s.timesteps:
        a = ac[t]
        x = s.step((x - a.sqrt() * m) / (1 - a).sqrt(), t, x).prev_sample
    return float((x - m).abs().max())


@pytest.mark.parametrize("extra", [{"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
                                   {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}] + RESPACED,
                         ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_lambda_ddim_default_is_ddim_off_the_tuned_knots(extra):
    s = LambdaDDIMScheduler.from_config(BASE, **extra)
    s.set_timesteps(5)
    assert s.lam == 0.0
    for n in (1, 2, 3, 5):  # the tuned λ gave 92 / 4.2 / 0.58 / 0.13 here with sigma_min
        ours = _point_mass_error(LambdaDDIMScheduler.from_config(BASE, **extra), n)
        ddim = _point_mass_error(LambdaDDIMScheduler.from_config(BASE, lam=0.0, **extra), n)
        assert ours == ddim


@pytest.mark.parametrize("extra", [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "leading"}])
def test_lambda_ddim_default_keeps_the_tuned_value_on_its_knots(extra):
    s = LambdaDDIMScheduler.from_config(BASE, **extra)
    for n in (5, 10, 20):
        s.set_timesteps(n)
        assert s.lam == tuned_lambda_on_knots(n) != 0.0
    assert LambdaDDIMScheduler.from_config(BASE, lam=0.3, use_karras_sigmas=True).lam == 0.3  # the user's λ wins


def test_lambda_ddim_sigma_min_no_longer_diverges():
    extra = {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}
    ref = _point_mass_error(diffusers.DPMSolverMultistepScheduler.from_config(BASE, **extra), 2)
    assert _point_mass_error(LambdaDDIMScheduler.from_config(BASE, **extra), 2) < 1.5 * ref < 0.1


# --------------------------------------------------------------------------- 3. degenerate knots
@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
def test_leading_with_every_knot_at_zero_is_refused(cls):
    s = cls.from_config(BASE, timestep_spacing="leading")
    ref = diffusers.DPMSolverMultistepScheduler.from_config(BASE, timestep_spacing="leading")
    ref.set_timesteps(1000)
    assert set(ref.timesteps.tolist()) == {0}  # DPM-Solver's rule: (N − 1) // (n + 1) = 0
    with pytest.raises(ValueError, match=r"1000 equal timesteps \(all 0\).*'trailing'"):
        s.set_timesteps(1000)
    s.set_timesteps(999)  # still distinct knots: DPM-Solver's own
    ref.set_timesteps(999)
    assert s.timesteps.tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
def test_leading_offset_past_the_schedule_is_a_value_error(cls):
    s = cls.from_config(BASE, timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset=1 and num_inference_steps=999 puts a timestep at 1000"):
        s.set_timesteps(999)


def test_equal_custom_timesteps_are_refused():
    with pytest.raises(ValueError, match="3 equal timesteps"):
        ConjugateMultistepScheduler().set_timesteps(timesteps=[5, 5, 5])


# --------------------------------------------------------------------------- 4. refused at from_config
@pytest.mark.parametrize("extra", RESPACED + [{"interp": "logsnr"}], ids=lambda e: ",".join(e))
def test_x0_logsnr_multistep_refused_by_from_config(extra):
    with pytest.raises(ValueError, match="predict='x0' with log-SNR"):
        ConjugateMultistepScheduler.from_config(BASE, predict="x0", **extra)
    # the combinations that work are still built (and run)
    for ok in ({"final_step": "x0"}, {"final_sigmas_type": "sigma_min"}):
        s = ConjugateMultistepScheduler.from_config(BASE, predict="x0", **extra, **ok)
        assert torch.isfinite(_loop(s, 5, lambda x, t: 0.9 * x, _x(), reuse=False)).all()


def test_custom_sigmas_x0_refused_at_set_timesteps():
    s = ConjugateMultistepScheduler(predict="x0")
    with pytest.raises(ValueError, match="predict='x0' with log-SNR"):
        s.set_timesteps(sigmas=[10.0, 5.0, 1.0, 0.1])


def test_recommended_drop_in_on_a_karras_config_says_how():
    cfg = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True).config
    with pytest.raises(ValueError, match="pass use_karras_sigmas=False with it"):
        ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN)
    logging.disable(logging.WARNING)
    try:
        s = ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN, use_karras_sigmas=False)
    finally:
        logging.disable(logging.NOTSET)
    s.set_timesteps(5)
    assert s.timesteps.tolist() == [819, 639, 459, 279, 99]


# --------------------------------------------------------------------------- 5. autograd through step
@pytest.mark.parametrize("make", [
    lambda: ConjugateMultistepScheduler.from_config(BASE),
    lambda: ConjugateMultistepScheduler.from_config(BASE, **RECOMMENDED_DROPIN),
    lambda: ConjugateMultistepScheduler.from_config(BASE, corrector=True, prediction_type="v_prediction"),
    lambda: LambdaDDIMScheduler.from_config(BASE),
    lambda: __import__("fastint.diffusers", fromlist=["DDIMScheduler"]).DDIMScheduler.from_config(BASE),
    lambda: FlowMatchConjugateScheduler(),
], ids=["cms", "cms-recommended", "cms-corrector-v", "lambda_ddim", "ddim", "flow"])
def test_gradients_flow_through_the_sampling_loop(make):
    """Reward fine-tuning and gradient guidance backpropagate through step (diffusers' own
    schedulers allow it): float64 gradcheck of a 4-step loop with respect to the initial noise and
    a model parameter."""
    w = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)

    def loop(x, w):
        s = make()
        s.set_timesteps(4)
        for t in s.timesteps:
            x = s.step(torch.tanh(w * x) + 0.1, t, x).prev_sample
        return x

    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(loop, (x, w))
    with torch.no_grad():
        plain = loop(x, w)
    assert torch.allclose(loop(x, w), plain, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- 6. mixed dtypes
@pytest.mark.parametrize("pair", ["ddim", "cms", "lambda_ddim", "flow"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=lambda d: f"out-{d[0]}-sample-{d[1]}".replace("torch.", ""))
def test_step_returns_the_dtype_diffusers_returns(pair, dtypes):
    from fastint.diffusers import DDIMScheduler

    ref, ours = {"ddim": (diffusers.DDIMScheduler, DDIMScheduler),
                 "cms": (diffusers.DPMSolverMultistepScheduler, ConjugateMultistepScheduler),
                 "lambda_ddim": (diffusers.DPMSolverMultistepScheduler, LambdaDDIMScheduler),
                 "flow": (diffusers.FlowMatchEulerDiscreteScheduler, FlowMatchConjugateScheduler)}[pair]
    got = []
    for cls in (ref, ours):
        s = cls()
        s.set_timesteps(4)
        x, e = _x(), _x(1)
        for t in s.timesteps[:3]:  # the first steps and a multistep one
            x = s.step(e.to(dtypes[0]), t, x.to(dtypes[1])).prev_sample
        got.append(x.dtype)
    assert got[0] == got[1]


def test_lambda_ddim_default_on_custom_sigmas_is_ddim():
    s = LambdaDDIMScheduler.from_config(BASE)
    s.set_timesteps(sigmas=[80.0, 10.0, 1.0, 0.1])
    assert s.lam == 0.0
    s.set_timesteps(timesteps=[999, 600, 300, 50])  # integer timesteps: the tuned knots' kind
    assert s.lam == tuned_lambda_on_knots(4) != 0.0
