"""fastint's diffusers schedulers against diffusers itself (offline, tiny random models).

The oracle model is exact: per-pixel Gaussian data N(MU, S^2), whose ε-prediction at
diffusers timestep k is σ_k (x − α_k MU)/(α_k² S² + σ_k²), and whose probability-flow ODE
keeps (x − α MU)/√(α² S² + σ²) constant, so every endpoint is known in closed form.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastint  # noqa: E402
from fastint.diffusers import (  # noqa: E402
    ConjugateMultistepScheduler,
    DDIMScheduler,
    LambdaDDIMScheduler,
)

MU, S = 0.3, 0.5
F32 = torch.finfo(torch.float32).eps
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


def gauss_model(alphas_cumprod, prediction="epsilon"):
    ac = alphas_cumprod.to(torch.float64)

    def f(x, k):
        a2 = ac[int(k)]
        a, sg = a2.sqrt(), (1 - a2).sqrt()
        xd = x.to(torch.float64)
        eps = sg * (xd - a * MU) / (a2 * S**2 + sg**2)
        x0 = (xd - sg * eps) / a
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sg * x0}[prediction]
        return out.to(x.dtype)
    return f


def run(scheduler, n, x, prediction="epsilon", eta=0.0, seed=None, **set_kw):
    f = gauss_model(scheduler.alphas_cumprod, prediction)
    scheduler.set_timesteps(n, **set_kw) if n is not None else scheduler.set_timesteps(**set_kw)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        kw = {}
        if eta:  # float32 draws from the generator, so that a float64 run sees the same noise
            kw = dict(eta=eta, variance_noise=torch.randn(x.shape, generator=g).to(x.dtype))
        x = scheduler.step(f(x, t), t, x, **kw).prev_sample
    return x


def prior(shape=(2, 3, 8, 8), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- DDIM parity
CASES = {
    "default_clip": (dict(), "epsilon", 0.0),
    "stable_diffusion": (SD_CONFIG, "epsilon", 0.0),
    "v_prediction": (dict(prediction_type="v_prediction", clip_sample=False), "v_prediction", 0.0),
    "sample_prediction": (dict(prediction_type="sample", clip_sample=False), "sample", 0.0),
    "thresholding": (dict(thresholding=True, sample_max_value=1.2), "epsilon", 0.0),
    "trailing": (dict(timestep_spacing="trailing", clip_sample=False), "epsilon", 0.0),
    "eta1": (dict(clip_sample=False), "epsilon", 1.0),
    "eta_half_sd": (SD_CONFIG, "epsilon", 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddim_matches_diffusers(case):
    """Same config, same noise: fastint's DDIMScheduler equals diffusers' to float32 rounding.

    Reference: diffusers' DDIMScheduler run in float64 (same float32 ᾱ). The tolerance is 4x
    diffusers' own float32 error against it plus 4 float32 ulps of the sample scale."""
    cfg, pred, eta = CASES[case]
    x = prior()
    ref64 = run(diffusers.DDIMScheduler(**cfg), 20, x.double(), pred, eta, seed=1)
    ref32 = run(diffusers.DDIMScheduler(**cfg), 20, x, pred, eta, seed=1)
    ours = run(DDIMScheduler(**cfg), 20, x, pred, eta, seed=1)
    assert ours.dtype == torch.float32
    scale = float(ref64.abs().max())
    tol = 4 * float((ref32.double() - ref64).abs().max()) + 4 * F32 * scale
    err = float((ours.double() - ref64).abs().max())
    assert err <= tol, (err, tol)
    # The tolerance resolves a one-timestep shift of the schedule.
    shifted = run(DDIMScheduler(**{**cfg, "steps_offset": cfg.get("steps_offset", 0) + 1}), 20, x, pred, eta, seed=1)
    if cfg.get("timestep_spacing", "leading") == "leading":
        assert float((shifted.double() - ref64).abs().max()) > 100 * tol


def test_ddim_eta_generator_draws_like_diffusers():
    x = prior()
    a, b = diffusers.DDIMScheduler(**SD_CONFIG), DDIMScheduler(**SD_CONFIG)
    outs = []
    for s in (a, b):
        s.set_timesteps(8)
        g, y = torch.Generator().manual_seed(3), x
        for t in s.timesteps:
            y = s.step(gauss_model(a.alphas_cumprod)(y, t), t, y, eta=0.7, generator=g).prev_sample
        outs.append(y)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=64 * F32 * float(outs[0].abs().max()))


def test_ddim_pred_original_sample_and_tuple_return():
    x = prior()
    a, b = diffusers.DDIMScheduler(**SD_CONFIG), DDIMScheduler(**SD_CONFIG)
    a.set_timesteps(10)
    b.set_timesteps(10)
    t = a.timesteps[3]
    b.set_begin_index(3)
    out = gauss_model(a.alphas_cumprod)(x, t)
    ra = a.step(out, t, x)
    prev, x0 = b.step(out, t, x, return_dict=False)
    assert torch.allclose(prev, ra.prev_sample, rtol=0, atol=8 * F32 * float(x.abs().max()))
    # x0 = (x - σ ε) / α: rounding scales with the inputs over α, not with |x0|
    a2 = float(a.alphas_cumprod[t])
    scale = (float(x.abs().max()) + (1 - a2) ** 0.5 * float(out.abs().max())) / a2**0.5
    assert torch.allclose(x0, ra.pred_original_sample, rtol=0, atol=4 * F32 * scale)


def test_custom_timesteps_against_textbook_ddim():
    """Non-uniform timesteps (set_timesteps(timesteps=...)) with the last step to σ = 0, against
    DDIM written out in float64 here."""
    ks = [999, 870, 640, 301, 120, 33, 4]
    x = prior()
    ours = run(DDIMScheduler(clip_sample=False), None, x, timesteps=ks)
    ac = diffusers.DDIMScheduler().alphas_cumprod.double()
    f = gauss_model(ac)
    z = x.double()
    for k, k1 in zip(ks, ks[1:] + [None]):
        a, a1 = ac[k], (ac[k1] if k1 is not None else torch.tensor(1.0, dtype=torch.float64))
        eps = f(z, k)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        z = a1.sqrt() * x0 + (1 - a1).sqrt() * eps
    assert float((ours.double() - z).abs().max()) <= 64 * F32 * float(z.abs().max())


# --------------------------------------------------------------------------- tables
def test_scheduler_table_is_one_op_table_on_its_knot_times():
    """set_timesteps builds one table, on the knot times t = (k+1)/N, in that call."""
    sch = ConjugateMultistepScheduler(solver_order=3, lower_final=False, final_step="x0")
    sch.set_timesteps(timesteps=[999, 870, 699, 511, 299, 119])
    tab = sch.table
    times = torch.tensor([1000, 871, 700, 512, 300, 120], dtype=torch.float64) / 1000
    ref = fastint.make_table(fastint.VPSDE(alphas_cumprod=sch.alphas_cumprod.double()), "conj_ms", times,
                             denoise=True, k=3)
    assert torch.equal(tab.coef, ref.coef) and len(tab) == 6
    assert tab.widths == (1, 2, 3, 3, 3, 1)  # the history each row reads; the x0 row reads one


@pytest.mark.parametrize("interp", ["t", "logsnr"])
def test_conj_ms_rows_are_exact_for_polynomial_eps_on_nonuniform_knots(interp):
    """Σ_j Q_j p(v_j) = ∫ w(u) p(v(u)) du for p of degree < k (v = t, or log σ/α with
    interp='logsnr'), w(u) = −(α'/α_u) ½β(u)/σ_u, by 40-point Gauss–Legendre on every knot
    interval (β is constant on each, w smooth)."""
    ac = diffusers.DDIMScheduler().alphas_cumprod.double()
    sde = fastint.VPSDE(alphas_cumprod=ac)
    knots = [1000, 871, 700, 512, 300, 120]
    sch = ConjugateMultistepScheduler(solver_order=3, interp=interp, lower_final=False, final_step="x0")
    sch.set_timesteps(timesteps=[k - 1 for k in knots])
    rows = sch.table.coef
    gx, gw = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(40))
    var = (lambda u: u) if interp == "t" else (lambda u: torch.log(sde.sigma(u) / sde.alpha(u)))

    def integral(t1, t, p):
        lo = torch.arange(round(t1 * 1000), round(t * 1000), dtype=torch.float64) / 1000
        u = (lo[:, None] + (gx[None] + 1) / 2000).flatten()
        w = -sde.alpha(torch.tensor(t1, dtype=torch.float64)) / sde.alpha(u) * 0.5 * sde.beta(u) / sde.sigma(u)
        return float((w * var(u)**p * gw.repeat(lo.numel())).sum() / 2000)

    for n in (1, 2, 3):
        t, t1 = knots[n] / 1000, knots[n + 1] / 1000
        m = min(3, n + 1)
        nodes = [float(var(torch.tensor([knots[n - j] / 1000], dtype=torch.float64))[0]) for j in range(m)]
        for p in range(m):
            got = sum(float(rows[n, 7 + 4 * j]) * nodes[j] ** p for j in range(m))
            assert got == pytest.approx(integral(t1, t, p), rel=1e-10, abs=1e-14), (n, p)
    # and the t-interpolated row is not exact for a quadratic in log σ (the option matters)
    if interp == "logsnr":
        other = ConjugateMultistepScheduler(solver_order=3, lower_final=False, final_step="x0")
        other.set_timesteps(timesteps=[k - 1 for k in knots])
        n, t, t1 = 3, knots[3] / 1000, knots[4] / 1000
        nodes = [float(var(torch.tensor([knots[n - j] / 1000], dtype=torch.float64))[0]) for j in range(3)]
        got = sum(float(other.table.coef[n, 7 + 4 * j]) * nodes[j] ** 2 for j in range(3))
        assert abs(got - integral(t1, t, 2)) > 1e-6 * abs(integral(t1, t, 2))


# --------------------------------------------------------------------------- accuracy
def _exact_endpoint(ac, x, k_first, k_last, to_zero=False):
    """PF-ODE solution from timestep k_first to k_last, then the x̂0 (Tweedie) step; or
    (to_zero) the PF-ODE solution at σ = 0."""
    ac = ac.double()

    def var(k):
        return ac[k] * S**2 + 1 - ac[k]
    xi = (x.double() - ac[k_first].sqrt() * MU) / var(k_first).sqrt()
    if to_zero:
        return MU + S * xi
    xl = ac[k_last].sqrt() * MU + var(k_last).sqrt() * xi
    a2 = ac[k_last]
    return MU + a2.sqrt() * S**2 * (xl - a2.sqrt() * MU) / var(k_last)


def _error(scheduler, n, **kw):
    x = prior((4, 1, 8, 8))
    out = run(scheduler, n, x, **kw)
    ts = scheduler.timesteps.tolist()
    to_zero = getattr(scheduler.config, "final_step", "x0") == "multistep"
    ref = _exact_endpoint(scheduler.alphas_cumprod, x, ts[0], ts[-1], to_zero=to_zero)
    return float((out.double() - ref).abs().max())


@pytest.mark.parametrize("spacing", ["leading", "nonuniform"])
def test_observed_orders(spacing):
    """Observed order (log2 of the error ratio at n and 2n steps): ddim ≈ 1, conj_ms k=2 ≈ 2, k=3 ≈ 3,
    and with the corrector k + 1, on uniform ('leading') and non-uniform (quadratic) timesteps."""
    def errors(make, n):
        if spacing == "leading":  # DDIM's leading timesteps (uniform, ending at timestep 0)
            return _error(make(), None, timesteps=(np.arange(n) * (1000 // n))[::-1].copy())
        ks = np.unique(np.round(20 + 979 * np.linspace(1, 0, n) ** 2).astype(int))[::-1].copy()
        return _error(make(), None, timesteps=ks)

    x0 = {"final_step": "x0"}  # the classic last step, against ODE-then-Tweedie
    makers = {1: lambda: DDIMScheduler(clip_sample=False),
              2: lambda: ConjugateMultistepScheduler(solver_order=2, **x0),
              3: lambda: ConjugateMultistepScheduler(solver_order=3, **x0)}
    makers = list(makers.items()) + [(2, lambda: ConjugateMultistepScheduler(solver_order=1, corrector=True, **x0)),
                                     (3, lambda: ConjugateMultistepScheduler(solver_order=2, corrector=True, **x0)),
                                     ]
    if spacing == "leading":  # the default final_step="multistep", against the ODE solution at σ = 0.
        # (Ending at timestep 20, the last interval down to σ = 0 is one long extrapolation in t,
        # where ε ~ σ ~ √t is not polynomial: k=3 then observes 2.3; docs/dropin.md.)
        makers += [(2, lambda: ConjugateMultistepScheduler(solver_order=2)),
                   (3, lambda: ConjugateMultistepScheduler(solver_order=3))]
    for k, make in makers:
        e1, e2 = errors(make, 20), errors(make, 40)
        order = np.log2(e1 / e2)
        assert k - 0.3 < order < k + 0.6, (k, e1, e2, order)


def test_lambda_ddim_scheduler():
    x = prior()
    ddim = run(DDIMScheduler(clip_sample=False), 15, x)
    lam0 = run(LambdaDDIMScheduler(lam=0.0), None, x, timesteps=DDIMScheduler_timesteps(15))
    assert float((lam0 - ddim).abs().max()) <= 16 * F32 * float(ddim.abs().max())
    s = LambdaDDIMScheduler()
    s.set_timesteps(15)
    assert s.lam == fastint.tuning.tuned_lambda(fastint.VPSDE(), 15, b="identity")[0] != 0.0
    # the tuned lam beats ddim on this problem (as it does on the tuning mixtures), same timesteps
    assert _error(LambdaDDIMScheduler(), 15) < _error(LambdaDDIMScheduler(lam=0.0), 15)


def DDIMScheduler_timesteps(n, **kw):
    s = DDIMScheduler(**kw)
    s.set_timesteps(n)
    return s.timesteps


def test_final_sigmas_type_and_set_alpha_to_one():
    x = prior()
    a = run(ConjugateMultistepScheduler(solver_order=1, final_sigmas_type="sigma_min"), None, x,
            timesteps=DDIMScheduler_timesteps(10))
    b = run(DDIMScheduler(clip_sample=False, set_alpha_to_one=False), 10, x)
    assert float((a - b).abs().max()) <= 16 * F32 * float(b.abs().max())
    c = run(DDIMScheduler(clip_sample=False), 10, x)
    assert float((c - b).abs().max()) > 1e-4  # σ = 0 and ᾱ_0 really differ


@pytest.mark.parametrize("kw", [{"solver_order": 3}, {"solver_order": 2, "corrector": True}])
def test_begin_index_and_history_reset(kw):
    """set_begin_index (img2img) starts mid-schedule; conj_ms then starts at order 1 (and
    the corrector has nothing to correct on the first step)."""
    s = ConjugateMultistepScheduler(**kw)
    f = gauss_model(s.alphas_cumprod)
    s.set_timesteps(12)
    x = prior()
    s.set_begin_index(4)
    y = x
    for t in s.timesteps[4:]:
        y = s.step(f(y, t), t, y).prev_sample
    z = run(ConjugateMultistepScheduler(**kw), None, x, timesteps=s.timesteps[4:])
    assert torch.allclose(y, z, rtol=0, atol=16 * F32 * float(z.abs().max()))
    with pytest.raises(ValueError, match="step called"):
        s.step(f(y, 0), 0, y)


def test_corrector_options():
    with pytest.raises(ValueError, match="corrector"):
        ConjugateMultistepScheduler(solver_order=3, corrector=True)
    with pytest.raises(TypeError, match="corrector"):
        ConjugateMultistepScheduler(corrector="yes")
    s = ConjugateMultistepScheduler.from_config(ConjugateMultistepScheduler(corrector=True).config)
    assert s.config.corrector is True
    # more accurate than without at 20 steps on the Gaussian problem
    assert _error(ConjugateMultistepScheduler(solver_order=2, corrector=True), 20) < \
        0.5 * _error(ConjugateMultistepScheduler(solver_order=2), 20)


def test_add_noise_and_velocity_match_diffusers():
    ref, ours = diffusers.DDIMScheduler(), LambdaDDIMScheduler()
    x0, noise = prior(), prior(seed=1)
    t = torch.tensor([0, 500, 999])
    x0, noise = x0[:1].expand(3, -1, -1, -1), noise[:1].expand(3, -1, -1, -1)
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


def test_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        LambdaDDIMScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="solver_order"):
        ConjugateMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="lam"):
        LambdaDDIMScheduler(lam=float("nan"))
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 1, 2, 2), 0, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(5, timesteps=[10, 2])
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="eta"):
        s.step(torch.zeros(1, 1, 2, 2), s.timesteps[0], torch.zeros(1, 1, 2, 2), eta=2.0)
    with pytest.raises(ValueError, match="timestep must be an integer"):  # (an off-schedule integer steps)
        s.step(torch.zeros(1, 1, 2, 2), 2.5, torch.zeros(1, 1, 2, 2))


def test_fastint_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; import fastint; "
            "assert 'fastint.diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- pipelines
def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def test_ddpm_pipeline_swap_and_save_reload(tmp_path):
    """DDPMPipeline with a random UNet2DModel: the fastint DDIM equals diffusers' DDIM through the
    pipeline; the other schedulers run from the same config; a saved pipeline reloads with them."""
    unet = _tiny_unet()
    base = diffusers.DDPMScheduler()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    ref = call()
    pipe.scheduler = DDIMScheduler.from_config(base.config)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.clip_sample is True
    assert np.abs(call() - ref).max() <= 1e-5
    outs = {}
    for cls in (LambdaDDIMScheduler, ConjugateMultistepScheduler):
        pipe.scheduler = cls.from_config(base.config)
        outs[cls] = call()
        assert outs[cls].shape == ref.shape and np.isfinite(outs[cls]).all()
        assert np.abs(outs[cls] - ref).max() > 1e-4
    pipe.save_pretrained(tmp_path)
    again = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler) is ConjugateMultistepScheduler
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.scheduler.config) == public(pipe.scheduler.config)
    out = again(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(out - outs[ConjugateMultistepScheduler]).max() <= 1e-6
    reloaded = ConjugateMultistepScheduler.from_pretrained(tmp_path / "scheduler")  # the scheduler alone
    assert public(reloaded.config) == public(pipe.scheduler.config)


def test_stable_diffusion_pipeline_cfg_callback():
    """A StableDiffusionPipeline from random tiny components (no text encoder: prompt_embeds),
    with classifier-free guidance and callback_on_step_end, runs with every fastint scheduler;
    fastint's DDIM equals diffusers' DDIM through it."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8)
    sd = diffusers.DDIMScheduler(**SD_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sd,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)

    def call(output_type="latent", **kw):
        seen = []

        def cb(p, i, t, kwargs):
            seen.append((i, int(t), kwargs["latents"].shape))
            return kwargs
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, height=8, width=8,
                   generator=torch.Generator().manual_seed(1), output_type=output_type,
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"], **kw).images
        return out, seen

    ref, seen_ref = call(num_inference_steps=5)
    assert [t for _, t, _ in seen_ref] == [801, 601, 401, 201, 1]
    pipe.scheduler = DDIMScheduler.from_config(sd.config)
    out, seen = call(num_inference_steps=5)
    assert seen == seen_ref
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    pipe.scheduler = LambdaDDIMScheduler.from_config(sd.config)
    out, seen = call(num_inference_steps=5)
    assert len(seen) == 5 and torch.isfinite(out).all() and float((out - ref).abs().max()) > 1e-3
    pipe.scheduler = ConjugateMultistepScheduler.from_config(sd.config)
    img, seen = call(timesteps=[900, 700, 350, 100], output_type="np")  # explicit timesteps, decoded
    assert [t for _, t, _ in seen] == [900, 700, 350, 100]
    assert img.shape == (1, 8, 8, 3) and np.isfinite(img).all()


def test_interp_auto_follows_the_knots():
    """interp='auto': polynomials in t on timestep spacings, in log σ on sigma schedules (Karras)."""
    def table(**kw):
        s = ConjugateMultistepScheduler(timestep_spacing="trailing", **kw)
        s.set_timesteps(8)
        return s.table.coef

    assert torch.equal(table(), table(interp="t"))
    assert torch.equal(table(use_karras_sigmas=True), table(use_karras_sigmas=True, interp="logsnr"))
    assert not torch.equal(table(use_karras_sigmas=True), table(use_karras_sigmas=True, interp="t"))


def test_unimplemented_config_keys_warn_and_flow_keys_raise(caplog):
    import logging

    cfg = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", lower_order_final=True).config
    with caplog.at_level(logging.WARNING):
        ConjugateMultistepScheduler.from_config(cfg)
    text = " ".join(r.getMessage() for r in caplog.records if "ignores config keys" in r.getMessage())
    assert "algorithm_type='dpmsolver++'" in text and "lower_order_final=True" in text
    assert "use_karras_sigmas" not in text  # implemented, so not reported
    for bad in ({"use_flow_sigmas": True}, {"prediction_type": "flow_prediction"}, {"invert_sigmas": True}):
        with pytest.raises(ValueError, match="does not support"):
            ConjugateMultistepScheduler.from_config({**cfg, **bad})


def test_last_knot_on_the_final_sigma_is_the_identity():
    """final_sigmas_type='sigma_min' with the last timestep at 0: that step maps to itself (no row)."""
    x = prior()
    s = ConjugateMultistepScheduler(final_sigmas_type="sigma_min", solver_order=1)
    y = run(s, None, x, timesteps=[700, 300, 0])
    assert len(s.table) == 2
    z = run(ConjugateMultistepScheduler(final_sigmas_type="sigma_min", solver_order=1), None, x, timesteps=[700, 300])
    # [700, 300] ends at sigma_min as well, through the same two rows; then 0 -> 0 is the identity
    assert torch.allclose(y, run(DDIMScheduler(clip_sample=False, set_alpha_to_one=False), None, x,
                                 timesteps=[700, 300, 0]), rtol=0, atol=16 * F32 * float(z.abs().max()))


def test_x0_prediction_scheduler():
    """predict='x0': the data-prediction frame; solver_order=1 is DDIM; x0 + log-SNR + a multistep
    last step to σ = 0 is refused (it extrapolates x̂0 in λ without bound)."""
    x = prior()
    a = run(ConjugateMultistepScheduler(solver_order=1, predict="x0", final_step="x0"), None, x,
            timesteps=DDIMScheduler_timesteps(10))
    b = run(DDIMScheduler(clip_sample=False), 10, x)
    assert float((a - b).abs().max()) <= 16 * F32 * float(b.abs().max())
    assert _error(ConjugateMultistepScheduler(predict="x0"), 20) < 0.5 * _error(DDIMScheduler(clip_sample=False), 20)
    with pytest.raises(ValueError, match="cannot integrate the last step"):
        ConjugateMultistepScheduler(predict="x0", interp="logsnr").set_timesteps(10)
    ConjugateMultistepScheduler(predict="x0", interp="logsnr", final_step="x0").set_timesteps(10)


def test_red_team_findings_are_clear_errors():
    """Found by a red-team pass: each is a clear error now (or diffusers' behaviour)."""
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    for cls in (ConjugateMultistepScheduler, LambdaDDIMScheduler, DDIMScheduler):
        with pytest.raises(ValueError, match="flow-matching config"):
            cls.from_config(flow)
    s = ConjugateMultistepScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="sigma_max"):
        s.set_timesteps(sigmas=[500.0, 100.0, 10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="trained_betas must hold"):
        ConjugateMultistepScheduler(trained_betas=list(np.linspace(1e-4, 0.02, 500))).set_timesteps(10)
    ConjugateMultistepScheduler(num_train_timesteps=10).set_timesteps(10)  # a repeated knot: a step of length 0
    with pytest.raises(ValueError, match="strictly decreasing"):
        ConjugateMultistepScheduler().set_timesteps(timesteps=[1, 500, 999])
    s = ConjugateMultistepScheduler()
    s.set_timesteps(10)
    x = prior()
    f = gauss_model(s.alphas_cumprod)
    t = s.timesteps[0]
    x = s.step(f(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="before the first step"):
        s.set_begin_index(5)
    with pytest.raises(ValueError, match="solver_order"):
        ConjugateMultistepScheduler(solver_order=2.0)


def test_repeated_timestep_lookup_matches_diffusers():
    """A repeated timestep (Karras at 1000 steps) starts at its second occurrence, as diffusers does."""
    ours, ref = ConjugateMultistepScheduler(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler(
        use_karras_sigmas=True)
    ours.set_timesteps(1000)
    ref.set_timesteps(1000)
    ts = ours.timesteps
    k = next(int(ts[i]) for i in range(len(ts) - 1) if ts[i] == ts[i + 1])
    x = prior((1, 1, 2, 2))
    ours.step(x, torch.tensor(k), x)
    ref.step(x, torch.tensor(k), x)
    assert ours.step_index == ref.step_index
