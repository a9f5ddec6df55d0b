"""Flow-matching schedulers inside real diffusers pipelines: a tiny random StableDiffusion3Pipeline
and a tiny random FluxPipeline (tests/flow_pipelines.py, offline), run end to end with the scheduler
swapped in the way users do it, `pipe.scheduler = Cls.from_config(pipe.scheduler.config)`.

SCHEDULERS holds diffusers' FlowMatchEulerDiscreteScheduler and, once fastint provides it,
fastint.diffusers.FlowMatchConjugateScheduler (same interface). Covered: the run gives finite output
of the right shape; a fixed generator gives the same output; save_pretrained/from_pretrained keeps
the scheduler class, its config and the output; SD3's classifier-free guidance (batch doubled);
Flux's dynamic shifting (mu from the image size), its guidance embedding and its true CFG.
"""
import functools
import math
import os
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
for _mod, _names in ((diffusers, ("StableDiffusion3Pipeline", "FluxPipeline", "SD3Transformer2DModel",
                                  "FluxTransformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler")),
                     (transformers, ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
                                     "T5EncoderModel", "T5Tokenizer", "T5Config"))):
    for _name in _names:
        try:
            getattr(_mod, _name)
        except Exception as e:  # lazy modules import on attribute access and may fail there
            pytest.skip(f"{_mod.__name__}.{_name} unavailable: {e!r}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/flow_pipelines.py, any import mode
from flow_pipelines import call_kwargs, tiny_pipeline  # noqa: E402

try:
    import fastint.diffusers as _fastint_diffusers
except Exception:  # the C++ extension is not built: treat the fastint schedulers as absent
    _fastint_diffusers = None

Euler = diffusers.FlowMatchEulerDiscreteScheduler
SCHEDULERS = [Euler]
_conjugate = getattr(_fastint_diffusers, "FlowMatchConjugateScheduler", None)
if _conjugate is not None:
    SCHEDULERS.append(_conjugate)

KINDS = ["sd3", "flux"]
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
IMAGE_HW = {"sd3": (16, 16), "flux": (8, 8)}
LATENT_SHAPE = {"sd3": (1, 4, 16, 16), "flux": (1, 16, 4)}  # Flux returns packed latents: (B, 4x4 tokens, 1x2x2)

sched_params = pytest.mark.parametrize("cls", SCHEDULERS, ids=[c.__name__ for c in SCHEDULERS])
kind_params = pytest.mark.parametrize("kind", KINDS)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors are tiny: one intra-op thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def swapped(kind, cls, seed=0):
    pipe = tiny_pipeline(kind, seed=seed)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is cls
    return pipe


def images(pipe, kind, **kw):
    return pipe(**call_kwargs(kind, **kw)).images


def count_steps(scheduler):
    """Wrap scheduler.step on the instance; returns the list of timesteps it is called with."""
    calls = []
    step = scheduler.step

    @functools.wraps(step)
    def wrapper(model_output, timestep, sample, *args, **kwargs):
        calls.append(float(timestep))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = wrapper
    return calls


def record_set_timesteps(scheduler):
    """Wrap scheduler.set_timesteps (keeping its signature, which retrieve_timesteps inspects)."""
    calls = []
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)
    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = wrapper
    return calls


def record_transformer(pipe):
    """Forward pre-hook on the transformer: the kwargs of every call."""
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


# ----------------------------------------------------------------------------- (a) runs
@kind_params
@sched_params
def test_runs_with_swapped_scheduler(kind, cls):
    pipe = swapped(kind, cls)
    steps = count_steps(pipe.scheduler)
    out = images(pipe, kind)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (1, *IMAGE_HW[kind], 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    n = len(pipe.scheduler.timesteps)
    assert n >= 4 and len(steps) == n  # one scheduler.step per timestep the scheduler set
    assert np.all(np.diff(steps) < 0)  # from noise (t ~ 1000) towards data

    latents = images(pipe, kind, output_type="latent")
    assert tuple(latents.shape) == LATENT_SHAPE[kind] and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    assert latents.std() > 1e-3


# ----------------------------------------------------------------------------- (b) determinism
@kind_params
def test_euler_deterministic(kind):
    pipe = tiny_pipeline(kind)
    ref = images(pipe, kind, seed=0)
    again = swapped(kind, Euler)  # swapping in the same class changes nothing
    np.testing.assert_array_equal(images(again, kind, seed=0), ref)
    np.testing.assert_array_equal(images(pipe, kind, seed=0), ref)  # the scheduler resets between calls
    assert np.abs(images(pipe, kind, seed=1) - ref).max() > 1e-4  # and the generator matters


@kind_params
@sched_params
def test_fixed_generator_reproducible(kind, cls):
    pipe = swapped(kind, cls)
    a = images(pipe, kind, seed=3, output_type="latent")
    b = images(pipe, kind, seed=3, output_type="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- (c) save / reload
@kind_params
@sched_params
def test_save_pretrained_keeps_scheduler(kind, cls, tmp_path):
    pipe = swapped(kind, cls)
    ref = images(pipe, kind)
    pipe.save_pretrained(tmp_path)
    again = getattr(diffusers, PIPELINES[kind]).from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again) is type(pipe) and type(again.scheduler) is cls
    assert public(again.scheduler.config) == public(pipe.scheduler.config)
    assert again.tokenizer_max_length == pipe.tokenizer_max_length
    np.testing.assert_allclose(images(again, kind), ref, rtol=0, atol=1e-6)
    alone = cls.from_pretrained(tmp_path / "scheduler")  # the scheduler by itself
    assert type(alone) is cls and public(alone.config) == public(pipe.scheduler.config)


# ----------------------------------------------------------------------------- (d) guidance, shifting
@sched_params
def test_sd3_classifier_free_guidance(cls):
    pipe = swapped("sd3", cls)
    calls = record_transformer(pipe)
    guided = images(pipe, "sd3", guidance_scale=5.0)
    n = len(pipe.scheduler.timesteps)
    assert len(calls) == n and all(c["hidden_states"].shape[0] == 2 for c in calls)  # [uncond, cond]
    assert all(c["encoder_hidden_states"].shape[0] == 2 for c in calls)
    calls.clear()
    plain = images(pipe, "sd3", guidance_scale=1.0)
    assert len(calls) == n and all(c["hidden_states"].shape[0] == 1 for c in calls)
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-4

    calls.clear()
    two = images(pipe, "sd3", guidance_scale=5.0, num_images_per_prompt=2)
    assert two.shape == (2, 16, 16, 3) and np.isfinite(two).all()
    assert all(c["hidden_states"].shape[0] == 4 for c in calls)


@sched_params
def test_sd3_static_shift(cls):
    """SD3's config: no dynamic shifting, so the pipeline passes no mu and the shift (3.0) applies."""
    pipe = swapped("sd3", cls)
    assert not pipe.scheduler.config.get("use_dynamic_shifting", False)
    assert pipe.scheduler.config.shift == 3.0
    set_calls = record_set_timesteps(pipe.scheduler)
    images(pipe, "sd3", output_type="latent")
    (args, kwargs), = set_calls
    assert "mu" not in kwargs and kwargs.get("sigmas") is None


def flux_mu(image_seq_len, config):
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * m + config.base_shift - m * config.base_image_seq_len


@sched_params
def test_flux_dynamic_shifting_and_guidance_embedding(cls):
    pipe = swapped("flux", cls)
    config = pipe.scheduler.config
    assert config.use_dynamic_shifting  # FLUX.1-dev's scheduler config, kept by from_config
    set_calls = record_set_timesteps(pipe.scheduler)
    calls = record_transformer(pipe)
    out = images(pipe, "flux", guidance_scale=3.5, num_inference_steps=4)
    assert np.isfinite(out).all()

    (args, kwargs), = set_calls  # FluxPipeline always passes its own sigmas and mu
    mu = flux_mu(16, config)  # 8x8 image -> 8x8 latent -> 4x4 packed tokens
    assert math.isclose(kwargs["mu"], mu, rel_tol=1e-9)
    np.testing.assert_allclose(kwargs["sigmas"], np.linspace(1.0, 1 / 4, 4))
    assert pipe.scheduler.begin_index == 0  # FluxPipeline calls set_begin_index(0)

    # guidance embedding: the transformer gets guidance_scale itself, with no batch doubling
    assert len(calls) == len(pipe.scheduler.timesteps)
    for c in calls:
        assert c["hidden_states"].shape[0] == 1
        torch.testing.assert_close(c["guidance"], torch.full((1,), 3.5))
    assert np.abs(images(pipe, "flux", guidance_scale=1.0) - out).max() > 1e-5


def test_flux_euler_timesteps_follow_mu():
    """With FlowMatchEuler the timesteps the Flux pipeline sets are 1000 * time_shift(mu, sigmas)."""
    pipe = tiny_pipeline("flux")
    images(pipe, "flux", output_type="latent", num_inference_steps=4)
    mu = flux_mu(16, pipe.scheduler.config)
    s = np.linspace(1.0, 1 / 4, 4)
    expect = 1000 * math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    np.testing.assert_allclose(pipe.scheduler.timesteps.numpy(), expect, rtol=1e-5)
    assert pipe.scheduler.sigmas[-1] == 0


@sched_params
def test_flux_true_cfg(cls):
    """true_cfg_scale > 1 with a negative prompt: two transformer calls per step."""
    pipe = swapped("flux", cls)
    calls = record_transformer(pipe)
    out = images(pipe, "flux", negative_prompt="blurry", true_cfg_scale=4.0)
    assert np.isfinite(out).all() and out.shape == (1, 8, 8, 3)
    assert len(calls) == 2 * len(pipe.scheduler.timesteps)
