"""The Sampler against exact answers: textbook DDIM, DOP853 references, Tweedie, NFE counts."""
import math

import numpy as np
import pytest
import torch

import fastint
from fastint.models import GaussianMixture, reference_solution, tweedie_reference

PROCS = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, z, t):
        self.calls += 1
        return self.inner(z, t)


def mixture(sde, dim=2):
    return GaussianMixture.default(sde, dim=dim)


@pytest.fixture(scope="module")
def references():
    """Per process: model, 64 prior draws, and the DOP853 solution at t_eps = 1e-3."""
    out = {}
    for name, cls in PROCS.items():
        sde = cls()
        model = mixture(sde)
        zT = sde.prior_sample((64, *model.data_shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out[name] = (sde, model, zT, reference_solution(model, sde, zT, t_eps=1e-3))
    return out


def test_vp_ddim_is_textbook_ddim():
    """fastint's VP `ddim` equals DDIM written from alphas alone (Song et al. 2021, eta = 0)."""
    sde = fastint.VPSDE()
    model = mixture(sde, dim=3)
    n, t_eps = 12, 1e-3
    zT = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = fastint.Sampler(sde, "ddim", nfe=n + 1, grid="quadratic", t_eps=t_eps).sample(model, zT.float())
    # independent float64 DDIM: quadratic grid, alpha_t = exp(-B/2), B = 0.1 t + 9.95 t^2
    ts = [t_eps + (1 - t_eps) * (1 - i / n) ** 2 for i in range(n + 1)]
    alpha = lambda t: math.exp(-0.5 * (0.1 * t + 0.5 * (20 - 0.1) * t * t))
    sigma = lambda t: math.sqrt(1 - alpha(t) ** 2)
    xr = zT.clone()
    for i in range(n):
        eps = model(xr, torch.full((32,), ts[i], dtype=torch.float64))
        x0 = (xr - sigma(ts[i]) * eps) / alpha(ts[i])
        xr = alpha(ts[i + 1]) * x0 + sigma(ts[i + 1]) * eps
    eps = model(xr, torch.full((32,), t_eps, dtype=torch.float64))
    xr = (xr - sigma(t_eps) * eps) / alpha(t_eps)
    assert torch.allclose(x.double(), xr, rtol=0, atol=2e-4 * xr.abs().max())


@pytest.mark.parametrize("proc", ["vp", "psld", "cld"])
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_first_order_convergence(references, proc, method):
    """Endpoint error against DOP853 halves with the step: measured slope in [0.8, 1.25]."""
    sde, model, zT, z_ref = references[proc]
    nfes = [40, 80, 160, 320]
    errs = []
    for nfe in nfes:
        s = fastint.Sampler(sde, method, nfe=nfe, grid="quadratic", denoise=False)
        z = s.sample(model, zT.float(), return_state=True)
        errs.append(float((z.double() - z_ref).flatten(1).norm(dim=1).mean()))
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert 0.8 <= slope <= 1.25, (errs, slope)
    assert errs[-1] < errs[0] / 4


@pytest.mark.parametrize("proc", ["vp", "psld", "cld"])
def test_denoise_row_is_tweedie(references, proc):
    """With denoise=True the last call maps the t_eps state to E[z0 | z] exactly (float64 Tweedie)."""
    sde, model, zT, _ = references[proc]
    n = 30
    z_eps = fastint.Sampler(sde, "ddim", nfe=n, denoise=False).sample(model, zT.float(), return_state=True)
    z_den = fastint.Sampler(sde, "ddim", nfe=n + 1, denoise=True).sample(model, zT.float(), return_state=True)
    expect = tweedie_reference(model, sde, z_eps.double(), 1e-3)
    x, xe = sde.data_part(z_den).double(), sde.data_part(expect)
    assert torch.allclose(x, xe, rtol=0, atol=1e-4 * xe.abs().max()), (x - xe).abs().max()


@pytest.mark.parametrize("method", ["euler", "em", "ddim"])
@pytest.mark.parametrize("denoise", [True, False])
def test_nfe_is_number_of_model_calls(method, denoise):
    sde = fastint.PSLD()
    model = Counting(mixture(sde))
    zT = sde.prior_sample((4, 2, 1, 1), generator=torch.Generator().manual_seed(0))
    for nfe in (2, 7, 10):
        model.calls = 0
        fastint.sample(model, sde, zT, method=method, nfe=nfe, denoise=denoise)
        assert model.calls == nfe


def test_shapes_and_return_state():
    sde = fastint.PSLD()
    model = mixture(sde)
    zT = sde.prior_sample((5, 2, 1, 1))
    assert zT.shape == (5, 4, 1, 1)
    s = fastint.Sampler(sde, "ddim", nfe=5)
    assert s.sample(model, zT).shape == (5, 2, 1, 1)
    assert s.sample(model, zT, return_state=True).shape == (5, 4, 1, 1)


def test_em_reproducible_and_seeded():
    sde = fastint.PSLD()
    model = mixture(sde)
    zT = sde.prior_sample((64, 2, 1, 1), generator=torch.Generator().manual_seed(0))
    s = fastint.Sampler(sde, "em", nfe=20)
    a = s.sample(model, zT, generator=torch.Generator().manual_seed(5))
    b = s.sample(model, zT, generator=torch.Generator().manual_seed(5))
    c = s.sample(model, zT, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-2
    st = fastint.Sampler(sde, "em", nfe=20, noise="torch")
    assert torch.equal(st.sample(model, zT, generator=torch.Generator().manual_seed(5)),
                       st.sample(model, zT, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("proc", ["vp", "psld"])
def test_em_matches_gaussian_target_moments(proc):
    """Euler–Maruyama on a 1-component Gaussian target: sample mean and variance within error bars."""
    sde = PROCS[proc]()
    mu, sd = 0.7, 0.5
    model = GaussianMixture(sde, torch.full((1, 4), mu), torch.tensor([sd]))
    n = 4000
    zT = sde.prior_sample((n, 4), generator=torch.Generator().manual_seed(0))
    x = fastint.Sampler(sde, "em", nfe=200).sample(model, zT, generator=torch.Generator().manual_seed(1)).double()
    # 4 coordinates x n samples; Monte-Carlo standard errors of mean and variance
    se_mean = sd / math.sqrt(4 * n)
    se_var = sd**2 * math.sqrt(2 / (4 * n))
    assert abs(x.mean() - mu) < 5 * se_mean + 0.01
    # with denoise=True the output is E[x0|x_eps]: its variance is sd^2 minus the posterior variance at t_eps
    assert abs(x.var() - sd**2) < 5 * se_var + 0.02 * sd**2


def test_prediction_score_x0_v_equivalent():
    """A model returning the score (or VP's x0 / v) samples the same as the eps model."""
    for proc in ("vp", "psld"):
        sde = PROCS[proc]()
        model = mixture(sde)
        zT = sde.prior_sample((16, 2, 1, 1), generator=torch.Generator().manual_seed(0))
        base = fastint.sample(model, sde, zT, method="ddim", nfe=8)
        as_score = lambda z, t: model.score(z, t).float()
        x = fastint.sample(as_score, sde, zT, method="ddim", nfe=8, prediction="score")
        assert torch.allclose(x, base, atol=1e-4)
        if proc == "vp":
            def as_x0(z, t):
                eps = model(z, t).double()
                a, s = sde.alpha(t.double())[:, None, None, None], sde.sigma(t.double())[:, None, None, None]
                return ((z - s * eps) / a).float()

            def as_v(z, t):
                eps = model(z, t).double()
                a, s = sde.alpha(t.double())[:, None, None, None], sde.sigma(t.double())[:, None, None, None]
                return (a * eps - s * (z - s * eps) / a).float()

            for pred, fn in (("x0", as_x0), ("v", as_v)):
                x = fastint.sample(fn, sde, zT, method="ddim", nfe=8, prediction=pred)
                assert torch.allclose(x, base, atol=1e-4), pred


# ---- bad input ---------------------------------------------------------------------
def test_bad_sampler_arguments():
    sde = fastint.PSLD()
    with pytest.raises(ValueError, match="method"):
        fastint.Sampler(sde, method="rk45")
    with pytest.raises(ValueError, match="grid"):
        fastint.Sampler(sde, grid="cosine")
    with pytest.raises(ValueError, match="nfe"):
        fastint.Sampler(sde, nfe=1, denoise=True)
    with pytest.raises(ValueError, match="nfe"):
        fastint.Sampler(sde, nfe=0, denoise=False)
    with pytest.raises(TypeError, match="nfe"):
        fastint.Sampler(sde, nfe=10.0)
    with pytest.raises(ValueError, match="prediction"):
        fastint.Sampler(sde, prediction="x0")  # x0 is VP-only
    with pytest.raises(ValueError, match="t_eps"):
        fastint.Sampler(sde, t_eps=0.0)
    with pytest.raises(ValueError, match="t_eps"):
        fastint.Sampler(sde, t_eps=1.5)
    with pytest.raises(TypeError, match="sde"):
        fastint.Sampler("psld")


def test_bad_sample_inputs():
    sde = fastint.PSLD()
    model = mixture(sde)
    s = fastint.Sampler(sde, nfe=4)
    with pytest.raises(ValueError, match="channels"):
        s.sample(model, torch.randn(2, 3, 1, 1))
    with pytest.raises(TypeError, match="zT"):
        s.sample(model, torch.zeros(2, 4, 1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="model"):
        s.sample(None, torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="model output"):
        s.sample(lambda z, t: z[:, :2], torch.randn(2, 4, 1, 1))
    # a model output that would be cast silently: int truncation, complex losing its imaginary part
    with pytest.raises(TypeError, match="model output must be a floating-point tensor, got torch.int32"):
        s.sample(lambda z, t: torch.zeros_like(z, dtype=torch.int32), torch.randn(2, 4, 1, 1))
    with pytest.raises(TypeError, match="floating-point.*complex64"):
        s.sample(lambda z, t: torch.zeros_like(z, dtype=torch.complex64), torch.randn(2, 4, 1, 1))
    # checked before the first model call, naming the argument
    em = fastint.Sampler(sde, "em", nfe=4)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        em.sample(model, torch.randn(2, 4, 1, 1), generator=3)
    with pytest.raises(TypeError, match="callback must be callable"):
        s.sample(lambda z, t: pytest.fail("model called"), torch.randn(2, 4, 1, 1), callback=3)


def test_integer_option_error_lists_integers():
    with pytest.raises(ValueError, match=r"option k must be one of \[1, 2, 3\], got 5$"):
        fastint.Sampler(fastint.VPSDE(), "conj_ms", nfe=6, k=5)


def test_flow_grid_ending_at_zero_contradicts_denoise_false():
    sde = fastint.FlowMatch(3.0)
    assert fastint.Sampler(sde, "euler", grid=[1.0, 0.5, 0.0]).denoise is True  # the x0 row
    with pytest.raises(ValueError, match="grid ends with sigma = 0.*denoise=True"):
        fastint.Sampler(sde, "euler", grid=[1.0, 0.5, 0.0], denoise=False)
    assert fastint.Sampler(sde, "euler", grid=[1.0, 0.5, 0.1], denoise=False).nfe == 2


def test_loop_compiles_fullgraph_without_host_sync():
    """The loop reads coefficients on the device: dynamo sees one graph and no break."""
    import torch._dynamo as dynamo

    sde = fastint.PSLD()
    s = fastint.Sampler(sde, "em", nfe=6)
    conv = torch.nn.Conv2d(4, 4, 1)
    model = lambda z, t: conv(z) * t[:, None, None, None]
    zT = sde.prior_sample((2, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    table, pred = s.device_table(zT.device)

    def loop(z):
        with torch.no_grad():
            return s.run(model, z, table, pred, seed=123)

    explained = dynamo.explain(loop)(zT)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    eager = loop(zT)
    compiled = torch.compile(loop, fullgraph=True)(zT)
    assert torch.allclose(compiled, eager, atol=1e-4)
