"""Training: the loss matches the samplers' ε convention, one step lowers it, checkpoints
round-trip and refuse the wrong process or shape, resume continues, the shipped models sample."""
import pytest
import torch

import fastint
from fastint.models import ContinuousUNet, GaussianMixture, load_checkpoint, save_checkpoint
from fastint.train import EMA, diffusion_loss, noise_state, train_denoiser

pytest.importorskip("sklearn")


@pytest.mark.parametrize("sde", [fastint.VPSDE(), fastint.PSLD(), fastint.CLD()], ids=["vp", "psld", "cld"])
def test_noised_state_matches_the_exact_eps_model(sde):
    """For point-mass data the exact ε-model (GaussianMixture, built on the sampler's
    convention s = -L^{-T} ε) must return exactly the ε that noise_state used."""
    mu = torch.tensor([[0.3, -0.5]], dtype=torch.float64)
    exact = GaussianMixture(sde, mu, torch.tensor([1e-6]))
    t = torch.tensor([0.01, 0.1, 0.3, 0.7, 1.0], dtype=torch.float64)
    eps = torch.randn(5, sde.dim * 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = noise_state(sde, mu.expand(5, 2), t, eps)
    assert torch.allclose(exact(z, t), eps, atol=1e-3)


@pytest.mark.parametrize("sde", [fastint.VPSDE(), fastint.PSLD()], ids=["vp", "psld"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(sde):
    torch.manual_seed(0)
    model = ContinuousUNet(in_channels=sde.dim, ch=8, ch_mult=(1, 2))
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss():
        return diffusion_loss(model, sde, x0, generator=torch.Generator().manual_seed(2))

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < 0.98 * before.detach()


def test_ema_tracks_with_warmup():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # decay_1 = min(0.9, 2/11)
    assert ema.model.weight.item() == pytest.approx(1 - 2 / 11)
    with pytest.raises(ValueError, match="decay"):
        EMA(m, decay=1.0)


def test_checkpoint_refuses_wrong_process_and_shape(tmp_path):
    sde = fastint.PSLD()
    model = ContinuousUNet(in_channels=2, ch=8, ch_mult=(1, 2))
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, sde, (1, 8, 8))
    loaded, sde2, _ = load_checkpoint(path, process="psld", data_shape=(1, 8, 8))
    z = sde.prior_sample((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(z, torch.ones(2)), model.eval()(z, torch.ones(2)))
    with pytest.raises(ValueError, match="trained for PSLD.*not for process VPSDE"):
        load_checkpoint(path, process="vp")
    with pytest.raises(ValueError, match="trained for PSLD.*not for process PSLD"):
        load_checkpoint(path, process=fastint.PSLD(kappa=0.1))
    with pytest.raises(ValueError, match="data of shape"):
        load_checkpoint(path, data_shape=(1, 16, 16))
    # weights of another width under this config
    ck = torch.load(path, weights_only=True)
    ck["config"]["ch"] = 16
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(ck)
    # a VP-width model saved as if it were for PSLD
    with pytest.raises(ValueError, match="input channels"):
        save_checkpoint(tmp_path / "bad.pt", ContinuousUNet(in_channels=1, ch=8), sde, (1, 8, 8))
    with pytest.raises(ValueError, match="holds a ContinuousUNet, not a UNet"):
        load_checkpoint(path, arch="UNet")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    """10 steps, save, resume to 20 == 20 steps straight, bit for bit (weights, EMA, RNG, optimizer)."""
    data = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(process="psld", batch=4, warmup=2, progress=False, log=None, data=data,
              model_overrides=dict(ch=8, attention=False))
    straight = tmp_path / "straight.pt"
    train_denoiser(steps=20, out=straight, **kw)
    half = tmp_path / "half.pt"
    train_denoiser(steps=10, out=half, **kw)
    assert load_checkpoint(half)[2]["meta"]["step"] == 10
    resumed = tmp_path / "resumed.pt"
    train_denoiser(steps=20, resume=half, out=resumed, **kw)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["meta"]["step"] == b["meta"]["step"] == 20 and a["meta"]["ema_n"] == b["meta"]["ema_n"] == 20
    for key in ("state_dict", "model_state"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_denoiser(steps=0, **kw)
    with pytest.raises(ValueError, match="not a resumable training checkpoint"):
        save_checkpoint(tmp_path / "plain.pt", ContinuousUNet(in_channels=2, ch=8), fastint.PSLD(), (1, 8, 8))
        train_denoiser(steps=20, resume=tmp_path / "plain.pt", **kw)


@pytest.mark.parametrize("name", ["psld", "vp"])
def test_shipped_checkpoint_loads_and_samples(name):
    model, sde, ck = load_checkpoint(name, data_shape=(1, 8, 8))
    assert type(sde).__name__ == {"psld": "PSLD", "vp": "VPSDE"}[name]
    assert isinstance(model, ContinuousUNet)
    zT = sde.prior_sample((8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = fastint.Sampler(sde, "lambda_ddim" if name == "psld" else "ddim", nfe=20).sample(model, zT)
    assert x.shape == (8, 1, 8, 8)
    assert torch.isfinite(x).all() and x.abs().max() < 3.0
