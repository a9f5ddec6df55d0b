"""float64 states and 1-D samples: the op's float64 path against the float64 reference, the
Sampler against an independent float64 DDIM, and [B] batches of scalars."""
import math

import pytest
import torch

import fastint
from fastint.models import GaussianMixture
from fastint.ops import philox_noise, philox_normals, step, step_reference

F64 = torch.float64


def _inputs(shape, dim, K, g, layout):
    z = torch.randn(shape, dtype=F64, generator=g)
    eps = [torch.randn(shape, dtype=F64, generator=g) for _ in range(K)]
    if layout == "transposed":
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2)
        eps = [e.transpose(-1, -2).contiguous().transpose(-1, -2) for e in eps]
    elif layout == "sliced":
        z = torch.randn((shape[0], shape[1], shape[2], 2 * shape[3]), dtype=F64, generator=g)[..., ::2]
    return z, eps


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("coef_dtype", [torch.float32, F64])
def test_op_float64_equals_float64_reference(dim, K, layout, coef_dtype):
    g = torch.Generator().manual_seed(dim * 10 + K)
    z, eps = _inputs((3, 2 * dim, 5, 7), dim, K, g, layout)
    coef = torch.randn(4, 7 + 4 * K, dtype=F64, generator=g).to(coef_dtype)
    noise = torch.randn(z.shape, dtype=F64, generator=g)
    for kw in ({}, {"noise": noise}):
        out = step(z, eps, coef, 2, dim, **kw)
        ref = step_reference(z, eps, coef, 2, dim, compute_dtype=F64, **kw)
        assert out.dtype == F64 and out.shape == z.shape and out.stride() == torch.empty_like(z).stride()
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    # the float32 result is ~1e-7 away: float64 is really computed in float64
    lo = step(z.float(), [e.float() for e in eps], coef.float(), 2, dim, noise=noise.float())
    assert (lo.double() - step(z, eps, coef, 2, dim, noise=noise)).abs().max() > 1e-9


@pytest.mark.parametrize("dim", [1, 2])
def test_op_float64_philox_noise_is_the_kernels(dim):
    """Seeded float64 steps add the same Philox normals as the float32 kernel (and the reference's
    normals to float32 Box–Muller accuracy), keyed by seed or seed_tensor."""
    g = torch.Generator().manual_seed(3)
    z, eps = _inputs((2, 2 * dim, 3, 33), dim, 1, g, "contiguous")
    coef = torch.randn(2, 11, dtype=F64, generator=g)
    xi = philox_noise(z, dim, seed=11, offset=5)
    assert xi.dtype == torch.float32
    torch.testing.assert_close(xi, philox_normals(11, 5, z.shape, dim), rtol=0, atol=2e-6)
    a = step(z, eps, coef, 1, dim, seed=11, offset=5)
    b = step(z, eps, coef, 1, dim, seed_tensor=torch.tensor([11]), offset=5)
    ref = step_reference(z, eps, coef, 1, dim, noise=xi.double(), compute_dtype=F64)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, rtol=1e-14, atol=1e-14)


def test_op_float64_refusals():
    z = torch.zeros(2, 2, 3)
    with pytest.raises(TypeError, match="coef must be a float32 table"):
        step(z, [z], torch.zeros(1, 11, dtype=F64), 0, 1)  # a float64 table needs a float64 state
    with pytest.raises(TypeError, match="eps\\[0\\] must have z's dtype"):
        step(z.double(), [z], torch.zeros(1, 11), 0, 1)
    with pytest.raises(TypeError, match="float64"):
        step(z.to(torch.int32), [z.to(torch.int32)], torch.zeros(1, 11), 0, 1)


def test_sampler_float64_is_textbook_ddim_to_float64_precision():
    """An independent float64 DDIM (alphas alone) equals the Sampler's float64 run to 1e-12."""
    sde = fastint.VPSDE()
    model = GaussianMixture.default(sde, dim=3)
    n, t_eps = 12, 1e-3
    zT = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = fastint.Sampler(sde, "ddim", nfe=n + 1, grid="quadratic", t_eps=t_eps).sample(model, zT)
    assert x.dtype == F64
    ts = [t_eps + (1 - t_eps) * (1 - i / n) ** 2 for i in range(n + 1)]
    alpha = lambda t: math.exp(-0.5 * (0.1 * t + 0.5 * (20 - 0.1) * t * t))  # noqa: E731
    sigma = lambda t: math.sqrt(1 - alpha(t) ** 2)  # noqa: E731
    xr = zT.clone()
    for i in range(n):
        eps = model(xr, torch.full((32,), ts[i], dtype=F64))
        xr = alpha(ts[i + 1]) * (xr - sigma(ts[i]) * eps) / alpha(ts[i]) + sigma(ts[i + 1]) * eps
    eps = model(xr, torch.full((32,), t_eps, dtype=F64))
    xr = (xr - sigma(t_eps) * eps) / alpha(t_eps)
    torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    x32 = fastint.Sampler(sde, "ddim", nfe=n + 1, grid="quadratic", t_eps=t_eps).sample(model, zT.float())
    assert (x32.double() - xr).abs().max() > 1e-9  # float32 cannot do that


@pytest.mark.parametrize("proc,method,options", [("psld", "conj_ms", {"k": 2, "corrector": "every"}),
                                                  ("cld", "em", {}), ("vp", "sddim", {"eta": 0.7})])
def test_sampler_float64_equals_a_float64_reference_loop(proc, method, options):
    """Every row through step_reference in float64 with the float64 table (the kernels' normals)."""
    sde = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}[proc]()
    model = GaussianMixture.default(sde, dim=2)
    s = fastint.Sampler(sde, method, nfe=9, **options)
    zT = sde.prior_sample((8, *model.data_shape), generator=torch.Generator().manual_seed(2), dtype=F64)
    key = 1234
    out = s.sample(model, zT, seed=key, return_state=True)
    tab = s.tab
    z, hist = zT, []
    for n in range(len(tab.calls)):
        kw = {}
        if s.info.stochastic:
            kw["noise"] = philox_noise(z, sde.dim, seed=key, offset=n * fastint.table.ROW_STRIDE).double()
        if tab.calls[n]:
            eps = model(z, torch.full((len(z),), float(tab.times[n]), dtype=F64))
            entry = eps if tab.history_conv is None else tab.history_conv[n, 0] * z + tab.history_conv[n, 1] * eps
            hist = [entry] + hist[: tab.history - 1]
            z = step_reference(z, hist[: tab.widths[n]], tab.coef, n, sde.dim, compute_dtype=F64, **kw)
        else:
            z = step_reference(z, [z], tab.coef, n, sde.dim, compute_dtype=F64, **kw)
    torch.testing.assert_close(out, z, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampler_one_dimensional_samples(dtype):
    """A [B] batch of scalars samples like [B, 1], the model called with [B]."""
    sde = fastint.VPSDE()
    mix = GaussianMixture.default(sde, dim=1)
    seen = []

    def flat(x, t):
        seen.append(x.shape)
        return mix(x[:, None], t)[:, 0]

    zT = torch.randn(10, dtype=dtype, generator=torch.Generator().manual_seed(0))
    for method in ("conj_ms", "sddim"):
        s = fastint.Sampler(sde, method, nfe=6)
        a = s.sample(flat, zT, seed=5)
        b = s.sample(mix, zT[:, None], seed=5)
        assert a.shape == (10,) and a.dtype == dtype and set(seen) == {(10,)}
        assert torch.equal(a, b[:, 0])
    with pytest.raises(ValueError, match="augmented|batch"):
        fastint.Sampler(fastint.PSLD(), "ddim", nfe=4).sample(flat, zT)


@pytest.mark.parametrize("flat", [False, True])
def test_k_diffusion_float64_ddim_is_euler_in_sigma(flat):
    """fastint.k_diffusion.sample_ddim in float64 equals Euler on dx/dσ = (x − D)/σ written out
    here to 1e-12; a [B] batch of scalars works like [B, 1]."""
    from fastint import k_diffusion as kd

    mu, s2 = 0.3, 0.25

    def denoiser(x, sigma):  # exact for data N(mu, s2)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return mu + s2 / (s2 + s**2) * (x - mu)

    sigmas = torch.tensor([20.0, 8.0, 3.0, 1.2, 0.5, 0.2, 0.05, 0.0], dtype=F64)
    x0 = torch.randn(6, 1, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * 20
    x = x0[:, 0, 0] if flat else x0[:, 0]
    xr = x.clone()
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        xr = xr + (s1 - s) * (xr - denoiser(xr, s.expand(len(xr)))) / s
    out = kd.sample_ddim(denoiser, x, sigmas, disable=True)
    assert out.dtype == F64 and out.shape == x.shape
    torch.testing.assert_close(out, xr, rtol=1e-12, atol=1e-12)


# ---- the diffusers schedulers ------------------------------------------------------------------
def _gauss_eps(x, ab, mu=0.3, v=0.25):
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return s * (x - a * mu) / (a * a * v + s * s)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_scheduler_float64_is_textbook_ddim(spacing):
    """fastint.diffusers.DDIMScheduler on float64 samples equals DDIM written out in float64 on the
    scheduler's own ᾱ to 1e-12 (a float32 run is ~1e-7 away)."""
    pytest.importorskip("diffusers")
    from fastint.diffusers import DDIMScheduler

    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    sch = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, set_alpha_to_one=True)
    sch.set_timesteps(10)
    ac, ts = sch.alphas_cumprod.double(), [int(t) for t in sch.timesteps]
    z, zr = x.clone(), x.clone()
    for i, t in enumerate(ts):
        e = _gauss_eps(zr, ac[t])
        ap = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=F64)
        zr = ap.sqrt() * (zr - (1 - ac[t]).sqrt() * e) / ac[t].sqrt() + (1 - ap).sqrt() * e
        z = sch.step(_gauss_eps(z, ac[t]), sch.timesteps[i], z).prev_sample
    assert z.dtype == F64
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)


def test_flow_scheduler_float64_order_1_is_euler():
    pytest.importorskip("diffusers")
    from fastint.diffusers import FlowMatchConjugateScheduler

    sch = FlowMatchConjugateScheduler(shift=3.0, solver_order=1, corrector=False)
    sch.set_timesteps(8)
    sig = sch.sigmas.double()
    x = torch.randn(3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    z, zr = x.clone(), x.clone()
    vel = lambda y, s: y * (2 * s - 1) / ((1 - s) ** 2 + s**2)  # noqa: E731  (exact v for x0 ~ N(0, 1))
    for i, t in enumerate(sch.timesteps):
        zr = zr + (sig[i + 1] - sig[i]) * vel(zr, sig[i])
        z = sch.step(vel(z, sig[i]), t, z).prev_sample
    assert z.dtype == F64
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)


def test_multistep_scheduler_float64_runs_in_float64():
    """ConjugateMultistepScheduler (defaults) on float64 samples: float64 out, within float32's
    rounding of the float32 run but not equal to it (the arithmetic is float64)."""
    pytest.importorskip("diffusers")
    from fastint.diffusers import ConjugateMultistepScheduler

    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    outs = []
    for dtype in (F64, torch.float32):
        sch = ConjugateMultistepScheduler()
        sch.set_timesteps(10)
        z = x.to(dtype)
        for t in sch.timesteps:
            z = sch.step(_gauss_eps(z, sch.alphas_cumprod[int(t)].to(dtype)), t, z).prev_sample
        outs.append(z)
    assert outs[0].dtype == F64
    gap = float((outs[0] - outs[1].double()).abs().max())
    assert 1e-10 < gap < 1e-5
