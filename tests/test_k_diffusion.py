"""fastint.k_diffusion against k-diffusion's own samplers and against exact answers.

k-diffusion's package __init__ imports torchvision, clean-fid and more; its sampling
functions need none of that. They are loaded here from the installed package's source
(k_diffusion/sampling.py and utils.append_dims, compiled with ast), unchanged, so a
`pip install --no-deps` k-diffusion is enough; without one the module is skipped.
"""
import ast
import importlib.util
import math
import os
import types

import numpy as np
import pytest
import torch

from fastint.k_diffusion import sample_conj_ms, sample_ddim, sample_lambda_ddim, sample_sddim, ve_table

MU, S = 0.3, 0.5
F32 = torch.finfo(torch.float32).eps


def _load_k_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.origin:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1; `make` does)",
                    allow_module_level=True)
    root = os.path.dirname(spec.origin)
    trange = pytest.importorskip("tqdm.auto", reason="k-diffusion's samplers need tqdm").trange

    def load(path, names, ns):
        tree = ast.parse(open(path).read())
        body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        assert {n.name for n in body} == set(names), f"k-diffusion changed: {path}"
        exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
        return ns

    utils = load(os.path.join(root, "utils.py"), {"append_dims"}, {"torch": torch})
    names = {"append_zero", "get_sigmas_karras", "to_d", "get_ancestral_step", "default_noise_sampler",
             "sample_euler", "sample_euler_ancestral"}
    ns = {"torch": torch, "math": math, "trange": trange,
          "utils": types.SimpleNamespace(append_dims=utils["append_dims"])}
    return types.SimpleNamespace(**{k: v for k, v in load(os.path.join(root, "sampling.py"), names, ns).items()
                                    if k in names})


K = _load_k_sampling()


def gauss_denoiser(x, sigma, scale=1.0):
    """Exact D(x; σ) of per-pixel N(MU, S²) data (k-diffusion convention), with an extra arg."""
    s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return (MU + S**2 / (S**2 + s**2) * (x.to(torch.float64) - MU) * scale).to(x.dtype)


def prior(sigma_max, shape=(2, 3, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * sigma_max).to(dtype)


def test_ddim_is_k_diffusion_sample_euler():
    """Same model, same sigmas (Karras, 12 steps to 0), extra_args passed through: fastint's
    ddim equals k-diffusion's sample_euler. Reference: sample_euler in float64; tolerance 4x
    sample_euler's own float32 error plus 4 ulps of the scale."""
    sig = K.get_sigmas_karras(12, 0.002, 80.0, device="cpu")
    x = prior(80.0)
    extra = {"scale": 1.0}
    ref64 = K.sample_euler(gauss_denoiser, x.double(), sig.double(), extra_args=extra, disable=True)
    ref32 = K.sample_euler(gauss_denoiser, x, sig, extra_args=extra, disable=True)
    seen = []
    ours = sample_ddim(gauss_denoiser, x, sig, extra_args=extra, disable=True,
                       callback=lambda d: seen.append((d["i"], float(d["sigma"]))))
    tol = 4 * float((ref32.double() - ref64).abs().max()) + 4 * F32 * float(ref64.abs().max())
    assert float((ours.double() - ref64).abs().max()) <= tol
    assert seen == [(i, float(sig[i])) for i in range(12)]
    # and the comparison is sensitive: a different schedule is far outside the tolerance
    other = sample_ddim(gauss_denoiser, x, K.get_sigmas_karras(12, 0.002, 80.0, rho=5.0), disable=True)
    assert float((other.double() - ref64).abs().max()) > 100 * tol


def test_sddim_eta1_is_k_diffusion_euler_ancestral():
    """Stochastic DDIM with eta = 1 is k-diffusion's sample_euler_ancestral (same noise sampler)."""
    sig = K.get_sigmas_karras(8, 0.01, 20.0)
    x = prior(20.0)
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def sampler(dtype):
        it = iter(noise)
        return lambda s, s1: next(it).to(dtype)
    ref = K.sample_euler_ancestral(gauss_denoiser, x.double(), sig.double(), disable=True,
                                   noise_sampler=sampler(torch.float64))
    ours = sample_sddim(gauss_denoiser, x, sig, eta=1.0, disable=True, noise_sampler=sampler(torch.float32))
    assert float((ours.double() - ref).abs().max()) <= 64 * F32 * float(ref.abs().max())
    det = sample_sddim(gauss_denoiser, x, sig, eta=0.0, disable=True)
    assert torch.allclose(det, sample_ddim(gauss_denoiser, x, sig, disable=True), rtol=0, atol=1e-6)


def test_lambda_ddim_lam0_is_exact_on_point_mass():
    """For a point mass at MU, D ≡ MU and DDIM is exact: x_i − MU = (σ_i/σ_0)(x_0 − MU) at every
    step, and the end is MU. lambda_ddim with lam = 0 must reproduce that; lam ≠ 0 must not."""
    sig = torch.tensor([30.0, 9.0, 2.5, 0.7, 0.1, 0.0])
    x = prior(30.0)
    traj = []
    point = lambda x, s: torch.full_like(x, MU)  # noqa: E731
    out = sample_lambda_ddim(point, x, sig, lam=0.0, disable=True, callback=lambda d: traj.append(d["x"]))
    for i, xi in enumerate(traj):
        exact = MU + float(sig[i] / sig[0]) * (x.double() - MU)
        assert torch.allclose(xi.double(), exact, rtol=0, atol=8 * F32 * 30.0)
    assert torch.allclose(out.double(), torch.full_like(out.double(), MU), rtol=0, atol=8 * F32)
    assert torch.equal(out, sample_ddim(point, x, sig, disable=True))
    off = sample_lambda_ddim(gauss_denoiser, x, sig, lam=-0.5, disable=True)
    assert float((off - sample_ddim(gauss_denoiser, x, sig, disable=True)).abs().max()) > 1e-3


def _endpoint_error(fn, n, **kw):
    sig = K.get_sigmas_karras(n, 0.01, 20.0)
    x = prior(20.0, shape=(4, 1, 8, 8))
    out = fn(gauss_denoiser, x, sig, disable=True, **kw)
    # exact PF-ODE to sigmas[-2], then the denoiser (the last step)
    s0, sl = float(sig[0]), float(sig[-2])
    xl = MU + (x.double() - MU) * math.sqrt((S**2 + sl**2) / (S**2 + s0**2))
    exact = MU + S**2 / (S**2 + sl**2) * (xl - MU)
    return float((out.double() - exact).abs().max())


def test_conj_ms_orders():
    """Observed order in the number of steps (Karras sigmas, Gaussian data): ddim ≈ 1, conj_ms
    order 2 ≈ 2, both multistep orders far more accurate than ddim. (Order 3 is capped near 2 here:
    the VP schedule built from the sigmas has β piecewise constant between them; docs/dropin.md.)"""
    orders = {}
    for name, fn, kw in (("ddim", sample_ddim, {}), ("ms2", sample_conj_ms, {"order": 2}),
                         ("ms3", sample_conj_ms, {"order": 3})):
        e1, e2 = _endpoint_error(fn, 20, **kw), _endpoint_error(fn, 40, **kw)
        orders[name] = (np.log2(e1 / e2), e2)
    assert 0.7 < orders["ddim"][0] < 1.5, orders
    assert 1.6 < orders["ms2"][0] < 2.6 and orders["ms3"][0] > 1.6, orders
    assert max(orders["ms2"][1], orders["ms3"][1]) < orders["ddim"][1] / 10, orders


def test_conj_ms_corrector_and_logsnr_options():
    """order=2 with corrector='every' and interp='logsnr' (log σ): observed order ≈ 3 (measured
    3.03 from 20 to 40 steps) and more accurate than plain order 2 there (measured 2.6×)."""
    kw = {"order": 2, "corrector": "every", "interp": "logsnr"}
    e1, e2 = _endpoint_error(sample_conj_ms, 20, **kw), _endpoint_error(sample_conj_ms, 40, **kw)
    assert np.log2(e1 / e2) > 2.6, (e1, e2)
    assert e2 < _endpoint_error(sample_conj_ms, 40, order=2) / 2
    with pytest.raises(ValueError, match="corrector"):
        sample_conj_ms(gauss_denoiser, prior(1.0), torch.tensor([1.0, 0.5, 0.0]), order=3, corrector="every")


def test_ve_table_rows_and_errors():
    sig = torch.tensor([10.0, 1.0, 0.0])
    t = ve_table(sig, "ddim").coef
    # Euler in σ: x' = x + (σ' − σ) ε, last row x' = x − σ ε
    assert t[0, 0].item() == pytest.approx(1.0, abs=1e-12) and t[0, 7].item() == pytest.approx(-9.0, rel=1e-12)
    assert t[1, 0].item() == pytest.approx(1.0, abs=1e-12) and t[1, 7].item() == pytest.approx(-1.0, rel=1e-12)
    one = sample_ddim(gauss_denoiser, prior(5.0), torch.tensor([5.0, 0.0]), disable=True)
    assert torch.allclose(one, gauss_denoiser(prior(5.0), torch.tensor([5.0])), atol=1e-6)
    x = prior(1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(gauss_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="positive"):
        sample_ddim(gauss_denoiser, x, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match="sigmas"):
        sample_ddim(gauss_denoiser, x, [1.0, 0.0])
    with pytest.raises(ValueError, match="order"):
        sample_conj_ms(gauss_denoiser, x, torch.tensor([1.0, 0.0]), order=4)
    with pytest.raises(ValueError, match="eta"):
        sample_sddim(gauss_denoiser, x, torch.tensor([1.0, 0.0]), eta=1.5)
    with pytest.raises(TypeError, match="model"):
        sample_ddim(None, x, torch.tensor([1.0, 0.0]))
    # a denoised output that would broadcast ([1, ...] for a batch) or be cast is refused
    with pytest.raises(ValueError, match="model output .* must have x's shape"):
        sample_ddim(lambda v, s: gauss_denoiser(v, s)[:1], x, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="floating-point"):
        sample_ddim(lambda v, s: gauss_denoiser(v, s).to(torch.int32), x, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="callback"):
        sample_ddim(gauss_denoiser, x, torch.tensor([1.0, 0.0]), callback=3)


@pytest.mark.parametrize("n,smin,smax", [(2, 0.002, 80.0), (5, 0.002, 80.0), (10, 0.002, 80.0), (40, 0.002, 80.0),
                                         (10, 0.03, 14.6)])
@pytest.mark.parametrize("zero_end", [True, False])
def test_conj_ms_one_point_is_ddim_on_small_sigma_min(n, smin, smax, zero_end):
    """With one point conj_ms is the exponential integrator, DDIM: Q = σ' − σ exactly, and with
    k points the Q_j sum to it (a constant ε is reproduced). On Karras sigmas down to 0.002 the ε
    integrand of the step into the smallest sigma is nearly singular in t (B → 0 at that knot);
    the quadrature in t left the one-point Q 0.08 % off DDIM's (−79.93 for −79.998), 0.21 off
    at the end of 2 steps. It now integrates in log(σ/α)."""
    s = K.get_sigmas_karras(n, smin, smax).double()
    s = s if zero_end else s[:-1]
    rows = len(s) - 1 - int(zero_end)  # the steps between positive sigmas (the x̂0 row apart)
    d = ve_table(s, "ddim").coef[:rows, 7]
    assert torch.allclose(d, s[1:rows + 1] - s[:rows], rtol=1e-10, atol=0)
    for k in (1, 2, 3):
        q = ve_table(s, "conj_ms", k=k).coef[:rows, 7::4].sum(1)
        assert torch.allclose(q, d, rtol=1e-11, atol=0), (k, (q / d - 1).abs().max())


def test_conj_ms_order1_equals_ddim_on_a_point_mass_to_sigma_min():
    pm = lambda x, sg: torch.full_like(x, 0.5)  # noqa: E731
    for n in (3, 5, 10):
        s = K.get_sigmas_karras(n, 0.002, 80.0)[:-1].double()
        x = prior(80.0, dtype=torch.float64)
        exact = 0.5 + float(s[-1]) * (x - 0.5) / 80.0
        for fn, kw in ((sample_ddim, {}), (sample_conj_ms, {"order": 1}), (sample_conj_ms, {})):
            assert torch.allclose(fn(pm, x, s, disable=True, **kw), exact, rtol=0, atol=1e-8), (n, kw)


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)])
def test_sddim_noise_sampler_calls_and_s_noise_as_k_diffusion(eta, s_noise):
    """noise_sampler is called for the same (sigma, sigma_next) as sample_euler_ancestral (not for
    the step to 0), so the global RNG is left in the same state; s_noise scales the noise."""
    sig = K.get_sigmas_karras(8, 0.01, 20.0)
    x = prior(20.0)
    got = {}
    for name, fn, dt in (("k", K.sample_euler_ancestral, torch.float64), ("ours", sample_sddim, torch.float32)):
        calls, g = [], torch.Generator().manual_seed(3)

        def ns(a, b, calls=calls, g=g, dt=dt):
            calls.append((float(a), float(b)))
            return torch.randn(x.shape, generator=g).to(dt)
        out = fn(gauss_denoiser, x.to(dt), sig.to(dt), disable=True, eta=eta, s_noise=s_noise, noise_sampler=ns)
        got[name] = (out.double(), calls)
    assert len(got["k"][1]) == len(got["ours"][1]) == 7
    assert np.allclose(got["ours"][1], got["k"][1], rtol=1e-6, atol=0)
    ref = got["k"][0]
    assert float((got["ours"][0] - ref).abs().max()) <= 64 * F32 * float(ref.abs().max())
    for fn in (K.sample_euler_ancestral, sample_sddim):  # default noise: randn_like, the same draws
        torch.manual_seed(5)
        fn(gauss_denoiser, x, sig, disable=True)
        got[fn] = torch.randn(4)
    assert torch.equal(got[K.sample_euler_ancestral], got[sample_sddim])
    with pytest.raises(ValueError, match="s_noise"):
        sample_sddim(gauss_denoiser, x, sig, s_noise=-1.0)


def test_lambda_ddim_default_lam_only_where_it_was_tuned():
    """lam=None: the tuned λ with sigmas ending at 0 and >= 3 model calls; DDIM (λ = 0) without the
    final 0 (it ended a point mass 3.4 away after 2 steps) and with 2 calls (13x DDIM's error)."""
    x = prior(80.0)
    ddim = lambda s: sample_ddim(gauss_denoiser, x, s, disable=True)  # noqa: E731
    lam = lambda s: sample_lambda_ddim(gauss_denoiser, x, s, disable=True)  # noqa: E731
    s = K.get_sigmas_karras(5, 0.002, 80.0)
    assert not torch.allclose(lam(s), ddim(s))  # tuned
    assert torch.equal(lam(s[:-1]), ddim(s[:-1]))  # no final 0
    s2 = K.get_sigmas_karras(2, 0.002, 80.0)
    assert torch.equal(lam(s2), ddim(s2))  # two calls


def test_lambda_ddim_tends_to_ddim_on_small_sigma_min():
    """lambda_ddim's weights on VE knots are integrated in log(σ/α) too: as λ → 0 they tend to
    DDIM's (the log-u rule left them 0.1 % off on the step into σ_min = 0.002)."""
    s = K.get_sigmas_karras(10, 0.002, 80.0).double()
    d = ve_table(s, "ddim").coef[:9, 7]
    q = ve_table(s, "lambda_ddim", lam=1e-9, b="identity").coef[:9, 7]
    assert torch.allclose(q, d, rtol=1e-9, atol=0)
