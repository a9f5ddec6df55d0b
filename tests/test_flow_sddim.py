"""Stochastic DDIM on the flow-matching path (fastint.flow._sddim_table): eta = 0 is Euler
exactly, and eta > 0 samples a Gaussian's law (exact x̂0) with the right mean and variance."""
import pytest
import torch

import fastint

MU, V0 = 0.7, 0.09


def x0_model(x, s):
    """E[x0 | x_σ] for x0 ~ N(MU, V0) on x_σ = (1 − σ) x0 + σ ε."""
    s = s.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    a = 1 - s
    return MU + a * V0 / (a * a * V0 + s * s) * (x - a * MU)


def test_eta_zero_is_euler():
    sde = fastint.FlowMatch(shift=3.0)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    e = fastint.Sampler(sde, "euler", nfe=9, prediction="x0").sample(x0_model, z)
    d = fastint.Sampler(sde, "sddim", nfe=9, prediction="x0", eta=0.0).sample(x0_model, z, seed=5)
    assert torch.equal(e, d)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sddim_samples_the_gaussian(eta):
    sde = fastint.FlowMatch()
    z = torch.randn(40000, 1, generator=torch.Generator().manual_seed(1))
    s = fastint.Sampler(sde, "sddim", nfe=400, grid="uniform", prediction="x0", eta=eta)
    x = s.sample(x0_model, z, seed=3)
    assert abs(float(x.mean()) - MU) < 0.01
    assert abs(float(x.var()) / V0 - 1) < 0.04
    # the noise is real: another key, other samples; few steps with eta = 1 lose variance
    y = s.sample(x0_model, z, seed=4)
    assert float((x - y).abs().mean()) > 0.05
    few = fastint.Sampler(sde, "sddim", nfe=10, grid="uniform", prediction="x0", eta=1.0).sample(x0_model, z, seed=3)
    assert float(few.var()) < 0.9 * V0


def test_sddim_flow_options_checked():
    with pytest.raises(ValueError, match="eta"):
        fastint.Sampler(fastint.FlowMatch(), "sddim", nfe=5, eta=1.5)
    assert "sddim" in fastint.flow.FLOW_METHODS


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sddim_noise_is_eta_times_the_ddpm_posterior_spread(eta):
    """The moment test cannot pin the noise level (every spread in DDIM's family keeps the
    marginal), so check the rows' S against the posterior of x' given (x, x0) by Gaussian
    conditioning: Var(x'|x0) = s'², Cov(x, x'|x0) = (a/a') s'², Var(x|x0) = s², hence
    Var(x'|x, x0) = s'² − (a/a')² s'⁴ / s². And P, Q keep the mean a' x0 + √(s'² − ς²) ε̂."""
    sig = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.05], dtype=torch.float64)
    tab = fastint.flow.flow_table(sig, "sddim", eta=eta)
    a, s, a1, s1 = 1 - sig[:-1], sig[:-1], 1 - sig[1:], sig[1:]
    post = s1**2 - (a / a1) ** 2 * s1**4 / s**2
    spread = eta * post.sqrt()
    torch.testing.assert_close(tab.coef[:, 4], spread, rtol=1e-12, atol=1e-14)
    P = (s1**2 - spread**2).sqrt() / s
    torch.testing.assert_close(tab.coef[:, 0], P, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tab.coef[:, 7], a1 - a * P, rtol=1e-12, atol=1e-14)
