"""No silent NaN: tables checked when built, results checked once after the loop (issue
"No silent NaN, no raw traceback", items 1 and 2)."""
import pytest
import torch

import fastint
from fastint.cli import main


def nan_model(z, t):
    return torch.full_like(z, float("nan"))


def test_sampler_raises_on_nan_model():
    S = fastint.Sampler(fastint.VPSDE(), "ddim", 5)
    with pytest.raises(FloatingPointError, match="non-finite.*check_finite=False skips this check"):
        S.sample(nan_model, torch.randn(2, 1, 4, 4))
    out = S.sample(nan_model, torch.randn(2, 1, 4, 4), check_finite=False)  # the opt-out
    assert torch.isnan(out).all()


def test_k_diffusion_nan_message_offers_no_missing_option():
    """The k-diffusion functions have no check_finite argument: the message must not offer one."""
    from fastint.k_diffusion import sample_ddim
    with pytest.raises(FloatingPointError, match="sample_ddim produced non-finite") as e:
        sample_ddim(lambda x, s: torch.full_like(x, float("nan")), torch.randn(2, 3), torch.tensor([1.0, 0.0]))
    assert "check_finite" not in str(e.value)


def test_sampler_flow_raises_on_inf_model():
    S = fastint.Sampler(fastint.FlowMatch(), "conj_ms", 5)
    with pytest.raises(FloatingPointError):
        S.sample(lambda z, s: torch.full_like(z, float("inf")), torch.randn(2, 3))


def test_finite_result_passes():
    S = fastint.Sampler(fastint.VPSDE(), "ddim", 5)
    out = S.sample(lambda z, t: torch.zeros_like(z), torch.randn(2, 1, 4, 4))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e39])
def test_unrepresentable_tables_raise(bad):
    """A coefficient that is not finite in float32 is a ValueError naming the table's owner and row.
    (lambda_ddim's lam = 1e3 made such a table, 8e46; lam is now bounded to [-10, 10].)"""
    from fastint.table import check_table

    coef = torch.ones(3, 11, dtype=torch.float64)
    check_table(coef, "ok")
    coef[1, 7] = bad
    with pytest.raises(ValueError, match="table of VPSDE-x is not finite in float32 \\(first at row 1"):
        check_table(coef, "VPSDE-x")
    with pytest.raises(ValueError, match="lam"):
        fastint.Sampler(fastint.VPSDE(), "lambda_ddim", 20, lam=1e3)
# (processes the maths cannot represent, such as PSLD(nu=1e300) or VPSDE(T=1e308), are refused by
# their constructors: tests/test_hardening.py)


def test_k_diffusion_raises_on_nan_denoiser():
    from fastint.k_diffusion import sample_conj_ms

    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    with pytest.raises(FloatingPointError):
        sample_conj_ms(nan_model, torch.randn(2, 1, 4, 4) * 10, sigmas, disable=True)


def test_schedulers_raise_at_the_last_step():
    pytest.importorskip("diffusers")
    from fastint.diffusers import ConjugateMultistepScheduler, DDIMScheduler, FlowMatchConjugateScheduler

    for cls in (ConjugateMultistepScheduler, DDIMScheduler, FlowMatchConjugateScheduler):
        s = cls()
        s.set_timesteps(4)
        x = torch.randn(2, 1, 4, 4)
        with pytest.raises(FloatingPointError, match=cls.__name__):
            for i, t in enumerate(s.timesteps):
                out = torch.full_like(x, float("nan")) if i == 1 else torch.zeros_like(x)
                x = s.step(out, t, x).prev_sample


def test_cli_never_writes_nan_samples(tmp_path, capsys):
    from fastint.models import ContinuousUNet, save_checkpoint

    net = ContinuousUNet(in_channels=1, ch=8, ch_mult=(1,), attention=False, resolution=8)
    with torch.no_grad():
        net.conv_in.weight.fill_(float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", net, sde=fastint.VPSDE(), data_shape=(1, 8, 8))
    out = tmp_path / "x.npz"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(path), "--nfe", "3", "--batch", "2", "--out", str(out), "--no-progress"])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "non-finite" in err[-1] and "Traceback" not in "\n".join(err)


def test_processes_are_immutable():
    for p in (fastint.VPSDE(), fastint.PSLD(), fastint.CLD(), fastint.FlowMatch()):
        with pytest.raises(AttributeError, match="immutable"):
            p.gamma = 1.0


def test_step_differentiates_where_inputs_require_grad():
    """With an input that requires grad the step runs as ATen ops (the fused kernels have no
    derivative): float64 gradcheck over z, the ε history, the noise and the coefficients, for
    both state dims; the value equals the fused step's."""
    from fastint.ops import step

    g = torch.Generator().manual_seed(0)
    for dim in (1, 2):
        z = torch.randn(2, 2 * dim, 3, dtype=torch.float64, generator=g, requires_grad=True)
        e0, e1, nz = (torch.randn(2, 2 * dim, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
        coef = torch.randn(2, 15, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: step(a[0], [a[1], a[2]], a[4], 1, dim, noise=a[3]),
                                        (z, e0, e1, nz, coef))
        with torch.no_grad():
            fused = step(z, [e0, e1], coef, 1, dim, noise=nz)
        assert torch.allclose(step(z, [e0, e1], coef, 1, dim, noise=nz), fused, rtol=0, atol=1e-12)


def test_step_with_grad_keeps_dtype_layout_and_philox_noise():
    from fastint.ops import step

    z = torch.randn(2, 4, 5, 3).to(memory_format=torch.channels_last).requires_grad_()
    eps = [torch.randn(2, 4, 5, 3)]
    coef = torch.randn(1, 11)
    with torch.no_grad():
        ref = step(z, eps, coef, 0, 2, seed=7)
    got = step(z, eps, coef, 0, 2, seed=7)
    assert got.requires_grad and got.dtype == z.dtype and got.stride() == ref.stride()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)  # the kernels' own normals
    got.sum().backward()
    c = coef[0]  # d sum(x', m') / d(x, m) = column sums of P
    assert torch.allclose(z.grad[:, :2], (c[0] + c[2]).expand(2, 2, 5, 3))
    assert torch.allclose(z.grad[:, 2:], (c[1] + c[3]).expand(2, 2, 5, 3))
    with pytest.raises(ValueError, match="out= cannot take the result"):
        step(z, eps, coef, 0, 2, out=torch.empty_like(z))