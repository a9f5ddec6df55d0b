"""Behaviours of diffusers' schedulers that pipelines rely on, checked on fastint's schedulers
against diffusers' own classes (offline): DDIM's stateless step from any integer timestep,
``_get_variance``, float32 ᾱ underflow, zero-terminal SNR, repeated knots, an unknown first
timestep of a multistep scheduler, learned-variance outputs, config keys that are reported
rather than dropped, and the reload of a saved pipeline in a fresh process.
"""
import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastint.diffusers import (  # noqa: E402
    ConjugateMultistepScheduler,
    DDIMScheduler,
    FlowMatchConjugateScheduler,
    LambdaDDIMScheduler,
)

F32 = torch.finfo(torch.float32).eps


def _x(shape=(2, 3, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _out(x, t):
    """A deterministic stand-in for a model output at timestep t (any smooth function of x and t)."""
    return 0.4 * x + 0.1 * torch.cos(torch.as_tensor(t, dtype=x.dtype) / 300)


def _close(a, b, rel=64 * F32):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= rel * scale


# --------------------------------------------------------------------------- DDIM: step from t
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_step_at_any_integer_timestep_matches_diffusers(prediction_type, spacing):
    """diffusers' DDIM computes the step from t (to t − N // n): a timestep outside the schedule
    (and any order of calls) gives diffusers' result, x̂0 included, with clipping and eta."""
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=True)
    ours, ref = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = _x()
    noise = _x(seed=1)
    for t in [1, 10, 37, 998, 0]:  # none of these is a knot of 10 steps but 0 with 'leading'
        for eta in (0.0, 0.5):
            kw = dict(eta=eta, variance_noise=noise) if eta else {}
            a = ours.step(_out(x, t), t, x, **kw)
            b = ref.step(_out(x, t), t, x, **kw)
            assert _close(a.prev_sample, b.prev_sample), (t, eta)
            assert _close(a.pred_original_sample, b.pred_original_sample), (t, eta)
    if spacing != "linspace":  # (with 'linspace' diffusers' DDIM steps to t − N // n, not to the next knot)
        for t in reversed(ref.timesteps[2:5]):  # knots, out of order and repeated: stateless as diffusers'
            for _ in range(2):
                assert _close(ours.step(_out(x, t), t, x).prev_sample, ref.step(_out(x, t), t, x).prev_sample)


def test_ddim_step_rejects_a_non_integer_timestep():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = _x()
    with pytest.raises(ValueError, match="timestep must be an integer"):
        s.step(x, 2.5, x)
    with pytest.raises(ValueError, match="timestep must be an integer"):
        s.step(x, 1000, x)


def test_ddim_get_variance_matches_diffusers():
    for set_alpha_to_one in (True, False):
        ours = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, beta_start=0.01)
        ref = diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one, beta_start=0.01)
        for t, prev in [(0, 0), (420, 400), (980, 960), (487, 486), (999, 998), (10, -10)]:
            assert torch.allclose(ours._get_variance(t, prev), ref._get_variance(t, prev), rtol=1e-6, atol=0)
    ref = diffusers.DDIMScheduler(beta_start=0.01)
    for cls in (LambdaDDIMScheduler, ConjugateMultistepScheduler):  # code written against DDIM may call it
        ours = cls(beta_start=0.01)
        for t, prev in [(0, 0), (420, 400), (980, 960), (999, 998)]:
            assert torch.allclose(ours._get_variance(t, prev), ref._get_variance(t, prev), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- ᾱ at the edges
def test_alphas_cumprod_underflow_steps_as_diffusers():
    """beta_end=0.2: the float32 ᾱ underflows to 0 long before timestep 999; diffusers builds the
    scheduler and steps, so fastint does too (its process takes the float64 product there)."""
    cfg = dict(beta_start=0.01, beta_end=0.2, clip_sample=False)
    ref = diffusers.DDIMScheduler(**cfg)
    assert float(ref.alphas_cumprod[-1]) == 0.0  # the premise: float32 underflow
    for cls in (DDIMScheduler, ConjugateMultistepScheduler, LambdaDDIMScheduler):
        s = cls(**{k: v for k, v in cfg.items()})
        assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)  # the public ᾱ is diffusers'
        s.set_timesteps(50)
    ours = DDIMScheduler(**cfg)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    x = _x()
    for t in ref.timesteps[-5:]:  # steps where ᾱ is a normal float32: diffusers' values
        a, b = ours.step(_out(x, t), t, x).prev_sample, ref.step(_out(x, t), t, x).prev_sample
        assert _close(a, b), int(t)


def test_betas_above_one_are_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        s = DDIMScheduler(beta_start=0.1, beta_end=2.0)
    assert any("falls below" in r.getMessage() and "betas >= 1" in r.getMessage() for r in caplog.records)
    s.set_timesteps(50)
    x = _x()
    ref = diffusers.DDIMScheduler(beta_start=0.1, beta_end=2.0)
    ref.set_timesteps(50)
    assert _close(s.step(_out(x, 0), 0, x).prev_sample, ref.step(_out(x, 0), 0, x).prev_sample)


def test_zero_terminal_snr_matches_diffusers():
    """rescale_betas_zero_snr: DDIM keeps diffusers' ᾱ_999 = 0 in public, the multistep classes
    DPM-Solver's 2^-24; a trailing v-prediction run (the zero-SNR recipe) agrees with diffusers'
    DDIM to the size of that 2^-24 floor of the process."""
    cfg = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
               clip_sample=False)
    ref = diffusers.DDIMScheduler(**cfg)
    ours = DDIMScheduler(**cfg)
    dpm = diffusers.DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod) and float(ours.alphas_cumprod[-1]) == 0.0
    assert torch.equal(ConjugateMultistepScheduler(rescale_betas_zero_snr=True).alphas_cumprod, dpm.alphas_cumprod)
    for n in (4, 10, 25):
        x = a = b = _x()
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        for t in ref.timesteps:
            a = ours.step(_out(a, t), t, a).prev_sample
            b = ref.step(_out(b, t), t, b).prev_sample
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()), n
        # order 1 of conj_ms is DDIM: the same run through the multistep class
        c = x
        s = ConjugateMultistepScheduler(solver_order=1, final_step="x0", **cfg)
        s.set_timesteps(timesteps=ref.timesteps)
        for t in s.timesteps:
            c = s.step(_out(c, t), t, c).prev_sample
        assert float((c - b).abs().max()) <= 1e-4 * float(b.abs().max()), n


# --------------------------------------------------------------------------- multistep schedules
@pytest.mark.parametrize("cls", [ConjugateMultistepScheduler, LambdaDDIMScheduler])
def test_repeated_knots_are_steps_of_length_zero(cls):
    """Many steps on few train timesteps repeat a knot (diffusers' DPM-Solver returns NaN there):
    the schedule keeps its length, the repeated step is the identity, and the run equals the run
    on the distinct knots."""
    s = cls(num_train_timesteps=25)
    s.set_timesteps(25)
    ts = s.timesteps
    assert len(ts) == s.num_inference_steps == 25 and bool((ts[1:] == ts[:-1]).any())
    x0 = _x()
    x = x0
    for t in ts:
        x = s.step(_out(x, t), t, x).prev_sample
    distinct = torch.unique_consecutive(ts)
    u = cls(num_train_timesteps=25)
    u.set_timesteps(timesteps=distinct)
    y = x0
    for t in u.timesteps:
        y = u.step(_out(y, t), t, y).prev_sample
    assert torch.isfinite(x).all() and torch.equal(x, y)


def test_unknown_first_timestep_is_the_last_step(caplog):
    """diffusers' DPM-Solver and UniPC take a first timestep that is not in the schedule as the
    last step; fastint's multistep classes do the same, with a warning."""
    x = _x()
    s = ConjugateMultistepScheduler()
    s.set_timesteps(10)
    with caplog.at_level(logging.WARNING):
        a = s.step(_out(x, 0), 0, x).prev_sample
    assert any("not in scheduler.timesteps" in r.getMessage() for r in caplog.records)
    assert s.step_index == 10
    ref = diffusers.DPMSolverMultistepScheduler()
    ref.set_timesteps(10)
    ref.step(_out(x, 0), 0, x)
    assert ref.step_index == s.step_index
    b_s = ConjugateMultistepScheduler()
    b_s.set_timesteps(10)
    b_s.set_begin_index(9)
    assert torch.equal(a, b_s.step(_out(x, 0), b_s.timesteps[9], x).prev_sample)


def test_flow_unknown_timestep_is_an_index_error_as_in_diffusers():
    ours = FlowMatchConjugateScheduler()
    ref = diffusers.FlowMatchEulerDiscreteScheduler()
    for s in (ours, ref):
        s.set_timesteps(10)
        with pytest.raises(IndexError):
            s.index_for_timestep(torch.tensor(123.5), s.timesteps)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        ours.index_for_timestep(torch.tensor(123.5))


# --------------------------------------------------------------------------- config keys
def test_learned_variance_outputs_are_split():
    """variance_type 'learned_range' (DDPM configs of models with a learned variance): a 2C-channel
    output is split and its first C channels used, as DPM-Solver does; DDIM accepts the config."""
    ddpm = diffusers.DDPMScheduler(variance_type="learned_range").config
    x = _x()
    extra = _x(seed=2)
    for cls in (ConjugateMultistepScheduler, LambdaDDIMScheduler, DDIMScheduler):
        s, plain = cls.from_config(ddpm), cls.from_config({**ddpm, "variance_type": None})
        assert s.config.variance_type == "learned_range"
        for sch in (s, plain):
            sch.set_timesteps(8)
        t = s.timesteps[0]
        out = _out(x, t)
        a = s.step(torch.cat([out, extra], 1), t, x).prev_sample
        assert torch.equal(a, plain.step(out, t, x).prev_sample), cls.__name__
    ref = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    ours = ConjugateMultistepScheduler(variance_type="learned_range", solver_order=1, final_step="x0")
    for sch in (ref, ours):
        sch.set_timesteps(8)
    t = ref.timesteps[0]
    assert _close(ours.step(torch.cat([_out(x, t), extra], 1), t, x).prev_sample,
                  ref.step(torch.cat([_out(x, t), extra], 1), t, x).prev_sample)  # order 1: both are DDIM
    with pytest.raises(ValueError, match="variance_type"):
        ConjugateMultistepScheduler(variance_type="learned_sigma")


def test_set_alpha_to_one_false_is_reported_not_dropped(caplog):
    """set_alpha_to_one=False (SD's DDIM config) ends at ᾱ_0, which the multistep classes do not
    do: it is named in the ignored-keys warning; True (their own ending) is not."""
    for value, reported in ((False, True), (True, False)):
        cfg = diffusers.DDIMScheduler(set_alpha_to_one=value).config
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ConjugateMultistepScheduler.from_config(cfg)
        text = " ".join(r.getMessage() for r in caplog.records if "ignores config keys" in r.getMessage())
        assert ("set_alpha_to_one" in text) == reported, value


def test_trained_betas_round_trip(tmp_path):
    betas = np.linspace(1e-4, 0.02, 1000) ** 1.1
    ref = diffusers.DDIMScheduler(trained_betas=betas)
    for cls in (DDIMScheduler, ConjugateMultistepScheduler):
        s = cls(trained_betas=betas)
        s.save_pretrained(tmp_path / cls.__name__)
        back = cls.from_pretrained(tmp_path / cls.__name__)
        assert torch.equal(back.betas, s.betas) and torch.equal(s.betas, ref.betas)
    short = DDIMScheduler(trained_betas=[0.1, 0.3])  # diffusers' suite builds and saves such a config
    short.save_pretrained(tmp_path / "short")
    assert DDIMScheduler.from_pretrained(tmp_path / "short").config.trained_betas == [0.1, 0.3]
    with pytest.raises(ValueError, match="trained_betas must hold"):  # but it is refused when used
        short.set_timesteps(2)


# --------------------------------------------------------------------------- saved pipelines
def _tiny_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return diffusers.DDPMPipeline(unet=unet, scheduler=ConjugateMultistepScheduler(solver_order=3, corrector=False))


_LOAD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    path, first = sys.argv[1], sys.argv[2]
    if first == "fastint.diffusers":
        import fastint.diffusers  # noqa: F401
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
    result = {"fastint_imported_before": "fastint" in sys.modules}
    for how in ("plain", "scheduler passed"):
        kw = {} if how == "plain" else {
            "scheduler": DPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler")}
        try:
            pipe = DiffusionPipeline.from_pretrained(path, **kw)
            result[how] = [type(pipe.scheduler).__module__, type(pipe.scheduler).__name__,
                           pipe.scheduler.config.get("solver_order")]
        except ValueError as e:
            result[how] = ["ValueError", str(e)]
    print("RESULT" + json.dumps(result))
""")


def _load_in_fresh_process(path, first):
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(path), first], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_saved_pipeline_reload_in_a_fresh_process(tmp_path):
    """The documented behaviour (docs/dropin.md): model_index.json names ["fastint.diffusers",
    class]; a process that has not imported fastint.diffusers cannot load it (diffusers imports
    no module a repository names, not even with the scheduler passed); one import is enough."""
    pipe = _tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastint.diffusers", "ConjugateMultistepScheduler"]

    bare = _load_in_fresh_process(tmp_path, "diffusers")
    assert bare["fastint_imported_before"] is False
    for how in ("plain", "scheduler passed"):
        kind, message = bare[how]
        assert kind == "ValueError" and "fastint.diffusers" in message and "import fastint.diffusers" in message

    ok = _load_in_fresh_process(tmp_path, "fastint.diffusers")
    assert ok["plain"] == ["fastint.diffusers", "ConjugateMultistepScheduler", 3]
    assert ok["scheduler passed"] == ["diffusers.schedulers.scheduling_dpmsolver_multistep",
                                      "DPMSolverMultistepScheduler", 3]


def test_every_timestep_repeated_is_refused():
    """'leading' with as many steps as train timesteps gives [0, 0] in diffusers (whose DPM-Solver
    then raises IndexError in step: its lookup takes the second of two equal timesteps). Every
    step there has length 0 and the result is the initial noise (std 1.05 with 1000 steps on the
    DDPM config, red-team finding), so fastint refuses those knots in set_timesteps. One repeated
    knot among distinct ones stays a step of length 0 (test_repeated_knots_are_steps_of_length_zero)."""
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=2, beta_start=0.001, beta_end=0.01,
                                                 timestep_spacing="leading")
    ref.set_timesteps(2)
    assert ref.timesteps.tolist() == [0, 0]
    for cls in (LambdaDDIMScheduler, ConjugateMultistepScheduler):
        s = cls(num_train_timesteps=2, beta_start=0.001, beta_end=0.01, timestep_spacing="leading")
        with pytest.raises(ValueError, match=r"2 equal timesteps \(all 0\)"):
            s.set_timesteps(2)
        s.set_timesteps(1)
        ref.set_timesteps(1)
        assert s.timesteps.tolist() == ref.timesteps.tolist() == [1]


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
@pytest.mark.parametrize("n", [3, 7, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_on_every_spacing(spacing, n, eta):
    """diffusers' DDIM steps from t to t − N // n, which is not the next timestep with 'linspace'
    or 'trailing' when n does not divide N (the linspace gap was up to 0.23). fastint's DDIM
    follows the same rule, so it matches to float32 rounding on every spacing, with noise too."""
    def eps_model(x, ab, mu=0.3, v=0.25):
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return s * (x - a * mu) / (a * a * v + s * s)

    outs = []
    for cls in (DDIMScheduler, diffusers.DDIMScheduler):
        sch = cls(timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1 if spacing == "leading" else 0)
        sch.set_timesteps(n)
        z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for t in sch.timesteps:
            z = sch.step(eps_model(z, sch.alphas_cumprod[int(t)]), t, z, eta=eta, generator=g).prev_sample
        outs.append(z)
    assert (outs[0] - outs[1]).abs().max() < 5e-6


def test_ddim_off_table_steps_use_the_floored_zero_snr_alpha():
    """Zero terminal SNR with 'linspace' (N = 10, 2 steps: 9 -> 4 is not the next timestep 0):
    the step from t = 9 uses the process's ᾱ_9 = 2^-24, as the table rows do, not the public 0
    (where ε-prediction divides by √ᾱ = 0: diffusers' DDIM gives NaN). Found by --slow."""
    s = DDIMScheduler(num_train_timesteps=10, beta_start=0.001, beta_end=0.01, timestep_spacing="linspace",
                      rescale_betas_zero_snr=True, clip_sample=False)
    s.set_timesteps(2)
    assert float(s.alphas_cumprod[-1]) == 0.0
    x = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        x = s.step(0.5 * x, t, x).prev_sample
    assert bool(torch.isfinite(x).all())
