"""`fastint sample` and `fastint methods` (in-process: fastint.cli.main(argv))."""
import numpy as np
import pytest
import torch

import fastint
from fastint.cli import main
from fastint.coefficients import METHODS


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    for name, info in METHODS.items():
        assert name in lines
        assert lines[name][1] == str(info.calls_per_step) and lines[name][2] == str(info.stochastic)
    assert "NFE/step" in out and "order" in out and "stochastic" in out


def test_sample_mixture_npz_matches_the_sampler(tmp_path, capsys):
    """The CLI's samples are exactly Sampler.sample on the same prior draw and seed."""
    out = tmp_path / "s.npz"
    assert main(["sample", "--method", "conj_ms", "--option", "k=3", "--nfe", "8", "--batch", "32",
                 "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    d = np.load(out)
    assert d["x"].shape == (32, 2, 1, 1) and str(d["method"]) == "conj_ms" and int(d["nfe"]) == 8
    sde = fastint.VPSDE()
    model = fastint.models.GaussianMixture.default(sde, dim=2)
    zT = torch.cat([sde.prior_sample((1, 2, 1, 1), generator=torch.Generator().manual_seed(fastint.seeding.sample_seed(3, i)))
                    for i in range(32)])  # sample i from its own (seed, i) generator
    x = fastint.Sampler(sde, "conj_ms", nfe=8, k=3).sample(model, zT)
    assert np.array_equal(d["x"], x.numpy())
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("process,method", [("psld", "lambda_ddim"), ("cld", "em"), ("vp", "sddim")])
def test_sample_png_every_process(tmp_path, process, method):
    out = tmp_path / "s.png"
    assert main(["sample", "--process", process, "--method", method, "--nfe", "5", "--batch", "64",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_from_checkpoint(tmp_path):
    """A (tiny, random) checkpoint written by fastint.models.save_checkpoint samples to a PNG grid."""
    from fastint.models import ContinuousUNet, save_checkpoint

    torch.manual_seed(0)
    net = ContinuousUNet(in_channels=1, ch=8, ch_mult=(1,), attention=False, resolution=8)
    path = save_checkpoint(tmp_path / "tiny.pt", net, sde=fastint.VPSDE(), data_shape=(1, 8, 8))
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(path), "--method", "ddim", "--nfe", "3", "--batch", "4",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npz = tmp_path / "x.npz"
    assert main(["sample", "--checkpoint", str(path), "--nfe", "3", "--batch", "2", "--out", str(npz),
                 "--no-progress"]) == 0
    assert np.load(npz)["x"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "method must be one of"),
    (["--method", "sddim", "--process", "psld"], "VP only"),
    (["--nfe", "1"], "does not fit"),
    (["--option", "lam"], "name=value"),
    (["--option", "eta=3"], "takes options"),
    (["--out", "x.jpg"], "--out must end in .npz or .png"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--checkpoint", "/no/such/file.pt"], "no checkpoint at"),
    (["--checkpoint", "classifier"], "no denoiser"),
    (["--process", "ve"], "invalid choice"),
])
def test_sample_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--out", str(tmp_path / "s.npz"), *argv] if "--out" not in argv else ["sample", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["sample", "methods"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: fastint" in capsys.readouterr().out


def test_sample_flow_checkpoint(tmp_path, capsys):
    """The shipped velocity model samples as a FlowMatch process (its --shift shapes the grid),
    the same as Sampler(FlowMatch(shift), prediction='flow') on the same per-sample draws."""
    out = tmp_path / "f.npz"
    assert main(["sample", "--checkpoint", "flow", "--shift", "3", "--method", "conj_ms", "--nfe", "5",
                 "--batch", "6", "--seed", "2", "--out", str(out), "--no-progress"]) == 0
    assert "FlowMatch" in capsys.readouterr().out
    net = fastint.models.load_pretrained("flow").model
    sde = fastint.FlowMatch(shift=3.0)
    zT = fastint.seeding.prior_draw(sde, (1, 8, 8), 2, 0, 6)
    x = fastint.Sampler(sde, "conj_ms", nfe=5, prediction="flow").sample(net, zT)
    assert np.array_equal(np.load(out)["x"], x.numpy())


@pytest.mark.parametrize("args,message", [
    (["--shift", "2"], "--shift is for flow-matching checkpoints"),
    (["--checkpoint", "vp", "--shift", "2"], "--shift is for flow-matching checkpoints"),
    (["--checkpoint", "flow", "--shift", "0"], "--shift: shift must be > 0"),
    (["--checkpoint", "vp", "--process", "vp"], "--process vp would be ignored"),
])
def test_sample_flow_refusals(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["sample", *args, "--out", str(tmp_path / "x.npz"), "--no-progress"])
    assert e.value.code == 2 and message in capsys.readouterr().err



def _help_of(flag, capsys, monkeypatch):
    """The help text of one `fastint sample` flag, on one line."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    start = out.index(f"  {flag} ")
    end = out.find("\n  --", start + 1)
    return " ".join(out[start:end].split())


def _listed(text):
    """The names of '... one of: a, b, c ...' in a help text."""
    import re

    m = re.search(r"one of: ([a-z_0-9]+(?:, [a-z_0-9]+)*)", text)
    assert m, text
    return m.group(1).split(", ")


def test_sample_help_lists_every_grid_the_sampler_accepts(capsys, monkeypatch):
    from fastint.flow import FLOW_GRIDS
    from fastint.grids import GRIDS

    listed = _listed(_help_of("--grid", capsys, monkeypatch))
    assert sorted(listed) == sorted(set(GRIDS) | set(FLOW_GRIDS))
    for g in listed:  # each one it lists is accepted, by a diffusion process and by a flow checkpoint's
        fastint.Sampler(fastint.VPSDE(), "ddim", nfe=5, grid=g)
        fastint.Sampler(fastint.FlowMatch(), "ddim", nfe=5, grid=g, prediction="flow")


def test_sample_help_lists_every_shipped_denoiser(capsys, monkeypatch):
    from fastint.models.checkpoint import PRETRAINED, load_checkpoint

    listed = _listed(_help_of("--checkpoint", capsys, monkeypatch))
    denoisers = [name for name in PRETRAINED if load_checkpoint(name)[1] is not None
                 or load_checkpoint(name)[2].get("prediction") == "flow"]
    assert sorted(listed) == sorted(denoisers) and "flow" in listed and "classifier" not in listed
