"""ConjugateMultistepScheduler(last_timestep=k): fastint's own spacing, the last n of n + 1
timesteps uniform from num_train_timesteps - 1 down to k (the recommended drop-in of
docs/dropin.md, k = 99; the knots of the README Sampler's grid="leading", t_eps=0.1).

Checked against diffusers' DPMSolverMultistepScheduler given the same knots through its public
``set_timesteps(timesteps=...)``: equal timesteps, equal sigmas (float32 rounding), and a whole
loop that equals our own scheduler given those knots as custom timesteps.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from fastint.diffusers import ConjugateMultistepScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
RECOMMENDED = dict(predict="x0", interp="logsnr", final_step="x0", corrector=True)


def _knots(n, last):
    return np.linspace(999, last, n + 1)[1:].round().astype(np.int64)


@pytest.mark.parametrize("cfg", [CFG, SD], ids=["ddpm", "sd-leading"])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 50])
@pytest.mark.parametrize("last", [0, 99, 250])
def test_knots_equal_dpm_solver_given_them(cfg, n, last):
    sch = ConjugateMultistepScheduler.from_config(cfg, last_timestep=last)
    sch.set_timesteps(n)
    want = _knots(n, last)
    assert sch.timesteps.tolist() == want.tolist()  # the config's timestep_spacing is replaced
    ref = DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(timesteps=want.tolist())
    assert torch.equal(sch.timesteps, ref.timesteps)
    torch.testing.assert_close(sch.sigmas.double(), ref.sigmas.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [5, 12])
def test_loop_equals_custom_timesteps(n):
    """The option is exactly `set_timesteps(timesteps=linspace(999, 99, n + 1)[1:].round())`."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.3

    def run(sch, **kw):
        sch.set_timesteps(**kw)
        x = x0.clone()
        for t in sch.timesteps:
            eps = torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + t.item() / 1000)
            x = sch.step(eps, t, x).prev_sample
        return x

    a = run(ConjugateMultistepScheduler.from_config(CFG, **RECOMMENDED, last_timestep=99), num_inference_steps=n)
    b = run(ConjugateMultistepScheduler.from_config(CFG, **RECOMMENDED), timesteps=_knots(n, 99).tolist())
    assert torch.equal(a, b)
    c = run(ConjugateMultistepScheduler.from_config(CFG, **RECOMMENDED, timestep_spacing="trailing"),
            num_inference_steps=n)
    assert not torch.allclose(a, c)  # trailing ends elsewhere: the option is not a no-op


def test_the_sampler_leading_grid_has_the_same_knots():
    """The README Sampler (grid='leading', t_eps=0.1, denoise: nfe model times) and the drop-in
    (last_timestep=99) call the model at the same times, t = (k + 1)/1000."""
    from fastint import Sampler, VPSDE

    for n in (5, 10, 20):
        s = Sampler(VPSDE(), "conj_ms", nfe=n, grid="leading", t_eps=0.1, denoise=True)
        sch = ConjugateMultistepScheduler.from_config(CFG, last_timestep=99)
        sch.set_timesteps(n)
        t = (sch.timesteps.double() + 1) / 1000
        assert s.grid_times.shape == t.shape
        assert (s.grid_times - t).abs().max() < 1e-3  # integer timesteps round t to 1/1000


def test_custom_timesteps_still_win():
    sch = ConjugateMultistepScheduler.from_config(CFG, last_timestep=99)
    sch.set_timesteps(timesteps=[900, 500, 10])
    assert sch.timesteps.tolist() == [900, 500, 10]


def test_round_trips_through_the_config(tmp_path):
    sch = ConjugateMultistepScheduler.from_config(CFG, last_timestep=99)
    sch.save_config(tmp_path)
    back = ConjugateMultistepScheduler.from_pretrained(tmp_path)
    assert back.config.last_timestep == 99
    back.set_timesteps(5)
    assert back.timesteps.tolist() == [819, 639, 459, 279, 99]


@pytest.mark.parametrize("bad", [-1, 999, 1000, 1.5, True, "99"])
def test_bad_values_are_named(bad):
    with pytest.raises(ValueError, match="last_timestep"):
        ConjugateMultistepScheduler.from_config(CFG, last_timestep=bad)


@pytest.mark.parametrize("kind", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"])
def test_sigma_schedules_conflict(kind):
    with pytest.raises(ValueError, match=f"last_timestep.*{kind}"):
        ConjugateMultistepScheduler.from_config(CFG, last_timestep=99, **{kind: True})


def test_above_the_clipped_first_timestep_is_refused():
    # lambda_min_clipped cuts the start of a cosine schedule: the first knot moves below 999
    cos = dict(CFG, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    ref = DPMSolverMultistepScheduler.from_config(cos, timestep_spacing="trailing")
    ref.set_timesteps(4)
    first = int(ref.timesteps[0])
    assert first < 999
    for bad in (first, first + 1):
        sch = ConjugateMultistepScheduler.from_config(cos, last_timestep=bad)
        with pytest.raises(ValueError, match="last_timestep"):
            sch.set_timesteps(4)
    sch = ConjugateMultistepScheduler.from_config(cos, last_timestep=first - 100)
    sch.set_timesteps(3)
    assert sch.timesteps.tolist() == np.linspace(first, first - 100, 4)[1:].round().astype(int).tolist()
