"""The image denoisers: shapes, real time conditioning, parameter counts, input validation."""
import pytest
import torch

import fastint
from fastint.models import ContinuousUNet, DigitClassifier, UNet


def tiny_cunet(in_channels, **kw):
    return ContinuousUNet(in_channels=in_channels, ch=8, ch_mult=(1, 2), resolution=8, **kw)


@pytest.mark.parametrize("sde", [fastint.VPSDE(), fastint.PSLD()], ids=["vp", "psld"])
@pytest.mark.parametrize("arch", ["cunet", "unet"])
def test_shapes_vp_and_psld(sde, arch):
    c = 1
    if arch == "cunet":
        model = tiny_cunet(sde.dim * c)
    else:
        model = UNet(in_channels=sde.dim * c, resolution=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,))
    model.eval()  # no dropout: two calls must agree
    z = sde.prior_sample((3, c, 8, 8), generator=torch.Generator().manual_seed(0))
    out = model(z, torch.full((3,), 0.5))
    assert out.shape == z.shape == (3, sde.dim * c, 8, 8)
    assert torch.isfinite(out).all()
    # a scalar time is broadcast over the batch
    assert torch.equal(model(z, 0.5), out)


def _randomize(model):
    """Non-zero weights everywhere (the last conv of every ODE field starts at zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_every_ode_block_depends_on_t():
    """The reference code's bug: blocks that ignore t. Feed each block the same input h and
    the embeddings of two different times: its output must change, for every block."""
    model = _randomize(tiny_cunet(2)).eval()
    temb_a = model.temb(torch.full((2,), 0.1))
    temb_b = model.temb(torch.full((2,), 0.7))
    g = torch.Generator().manual_seed(1)
    blocks = model.ode_blocks()
    assert len(blocks) == 2 * model.num_levels + 1
    for i, block in enumerate(blocks):
        ch = block.func.conv1.in_channels
        h = torch.randn(2, ch, 4, 4, generator=g)
        da = block(h, temb_a) - h
        db = block(h, temb_b) - h
        assert (da - db).abs().max() > 1e-3 * da.abs().max(), f"ODE block {i} ignores t"


def test_output_depends_on_t_through_blocks_only():
    """With the linear skip off the whole network's t-dependence runs through the ODE blocks:
    still the output changes with t."""
    model = _randomize(tiny_cunet(1, linear_skip=False)).eval()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    a, b = model(z, torch.full((2,), 0.2)), model(z, torch.full((2,), 0.9))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_ode_block_is_rk4_of_its_field():
    """One ODE block = RK4 on h' = f(h); more steps converge to the same flow (order 4)."""
    torch.manual_seed(0)
    model = _randomize(tiny_cunet(1)).double()
    block = model.down_blocks[0]
    temb = model.temb(torch.full((1,), 0.3)).double()
    h = 0.5 * torch.randn(1, 8, 8, 8, dtype=torch.float64)
    outs = {}
    for steps in (4, 8, 64):
        block.steps = steps
        outs[steps] = block(h, temb)
    e4 = (outs[4] - outs[64]).abs().max()
    e8 = (outs[8] - outs[64]).abs().max()
    assert e4 > 0 and 10 < e4 / e8 < 25  # 2^4 = 16 for a 4th-order method


def test_ddpm_unet_parameter_count():
    """Ho et al.'s CIFAR-10 U-Net: 35,746,307 parameters (the published 35.7M)."""
    with torch.device("meta"):
        model = UNet.ddpm_cifar10()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_continuous_unet_is_about_a_quarter():
    with torch.device("meta"):
        n_u = sum(p.numel() for p in UNet.ddpm_cifar10().parameters())
        n_c = sum(p.numel() for p in ContinuousUNet.cifar32().parameters())
    assert 0.2 < n_c / n_u < 0.3


def test_bad_inputs_name_the_argument():
    model = tiny_cunet(2)
    with pytest.raises(ValueError, match="z must have shape"):
        model(torch.zeros(1, 1, 8, 8), torch.ones(1))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 2, 7, 8), torch.ones(1))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.zeros(2, 2, 8, 8), torch.ones(3))
    with pytest.raises(TypeError, match="t must be"):
        model(torch.zeros(2, 2, 8, 8), "0.5")
    with pytest.raises(TypeError, match="ch must be an int"):
        ContinuousUNet(ch=8.0)
    with pytest.raises(ValueError, match="ode_steps must be >= 1"):
        ContinuousUNet(ode_steps=0)
    with pytest.raises(ValueError, match="resolution must be divisible"):
        UNet(resolution=30)
    with pytest.raises(ValueError, match="x must have shape"):
        DigitClassifier()(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("sde", [fastint.VPSDE(), fastint.PSLD()], ids=["vp", "psld"])
def test_samples_with_every_fastint_sampler(sde):
    """SPEC §7: the ContinuousUNet runs under every sampler that applies to the process."""
    from fastint.demo import fit_nfe

    model = tiny_cunet(sde.dim).eval()
    zT = sde.prior_sample((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ran = []
    for name, info in fastint.METHODS.items():
        if (info.vp_only and sde.dim != 1) or (getattr(info, "aug_only", False) and sde.dim == 1):
            continue
        x = fastint.Sampler(sde, name, nfe=fit_nfe(name, 7)).sample(model, zT, generator=torch.Generator())
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all(), name
        ran.append(name)
    assert {"euler", "ddim", "lambda_ddim"} <= set(ran)
