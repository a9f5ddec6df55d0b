"""The command line in a user's environment: --threads on every command, --version, what
`fastint methods` claims, `train --resume` refusals, `demo --toy` marks, `bench` warnings."""
import re

import pytest
import torch

import fastint
from fastint import bench
from fastint.cli import DEFAULT_THREADS, main
from fastint.coefficients import METHODS
from fastint.models import GaussianMixture

COMMANDS = ("demo", "methods", "train", "bench", "sample")


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_takes_threads(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "--threads N" in capsys.readouterr().out


def test_threads_is_applied_before_the_command(keep_threads, capsys):
    torch.set_num_threads(2)
    assert main(["methods"]) == 0
    assert torch.get_num_threads() == DEFAULT_THREADS == 1  # the default measured best on a busy 2-core machine
    assert main(["methods", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    # given after the command wins over before it, even at the default value
    assert main(["--threads", "2", "methods", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["--threads", "2", "methods"]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value, message", [("0", "--threads must be >= 1, got 0"),
                                            ("-3", "--threads must be >= 1, got -3"),
                                            ("two", "expected an integer, got 'two'")])
def test_bad_threads(value, message, keep_threads, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--threads", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and message in err[-1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"fastint {fastint.__version__} (torch {torch.__version__}, ")
    assert ("triton" in out) and len(out.splitlines()) == 1


def _methods_listing(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {}
    for above, line in zip(lines, lines[1:]):
        m = re.match(r"\s+processes: (.*); options: (.*)$", line)
        if m:
            listed[above.split()[0]] = (m.group(1).split(", "), m.group(2))
    return listed


def test_methods_lists_processes_that_the_sampler_accepts(capsys):
    """Each listed process is one Sampler accepts the method on, and each unlisted one it refuses."""
    listed = _methods_listing(capsys)
    assert set(listed) == set(METHODS)
    procs = {"VP": fastint.VPSDE(), "PSLD": fastint.PSLD(), "CLD": fastint.CLD(), "FlowMatch": fastint.FlowMatch(3.0)}
    for name, (processes, _) in listed.items():
        assert set(processes) <= set(procs), (name, processes)
        for pname, sde in procs.items():
            nfe = 2 * METHODS[name].calls_per_step + 1
            try:
                fastint.Sampler(sde, name, nfe=nfe)
                ok = True
            except (ValueError, TypeError):
                ok = False
            assert ok == (pname in processes), (name, pname)


def test_methods_lists_options_with_defaults(capsys):
    listed = _methods_listing(capsys)
    assert listed["euler"][1] == "none"
    assert "k=2 (1|2|3)" in listed["conj_ms"][1]
    assert "corrector='none' (none|start|every|inner)" in listed["conj_ms"][1]
    assert "eta=1.0 (0 to 1)" in listed["sddim"][1]
    assert "lam=tuned per process and NFE" in listed["lambda_ddim"][1]
    assert "alias of cvv" in listed["cspsd"][1]
    for name, info in METHODS.items():  # every option is named, and only the method's own
        opts = listed[name][1]
        assert all(f"{o.name}=" in opts for o in info.specs), name
        for value in opts.split(", ") if info.specs else ():
            assert value.split("=")[0] in info.options, (name, value)


# ------------------------------------------------------------------------ train --resume
@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A resumable 2-step PSLD run of a tiny model."""
    from fastint.train import train_denoiser
    path = tmp_path_factory.mktemp("train") / "run.pt"
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train_denoiser("psld", steps=2, batch=4, warmup=1, out=path, progress=False, log=None, data=data,
                   model_overrides=dict(ch=8, ch_mult=(1,), attention=False))
    return path


@pytest.mark.parametrize("extra, message", [
    ([], "give --out and/or --ship"),
    (["--out", "{tmp}/b.pt", "--steps", "1"], "steps must exceed the 2 steps already done"),
    (["--out", "{tmp}/b.pt", "--steps", "2"], "steps must exceed the 2 steps already done"),
    (["--out", "{tmp}/b.pt", "--steps", "4", "--process", "vp"], "process 'vp' differs from the resumed "
     "checkpoint's PSLD"),
    (["--out", "{tmp}/b.pt", "--steps", "4", "--arch", "unet"], "arch 'unet' differs"),
    (["--out", "{tmp}/b.pt", "--steps", "4", "--lr", "0.1"], "lr=0.1 differs from the resumed run's lr=0.002"),
    (["--out", "{tmp}/b.pt", "--steps", "4", "--ch", "16"], "--ch=16 differs from the resumed model's ch=8"),
])
def test_resume_refuses_inconsistent_arguments(run2, tmp_path, extra, message, capsys, keep_threads):
    argv = ["train", "--resume", str(run2), "--no-progress"] + [a.format(tmp=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "b.pt").exists()


def test_resume_with_consistent_arguments_trains_on(run2, tmp_path, capsys, keep_threads, monkeypatch):
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr("fastint.train.load_digits", lambda split: (data, None))
    out = tmp_path / "c.pt"
    assert main(["train", "--resume", str(run2), "--steps", "3", "--process", "psld", "--out", str(out),
                 "--no-progress"]) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["meta"]["step"] == 3
    assert "final loss nan" not in capsys.readouterr().out


def test_train_without_an_output_is_refused(capsys, keep_threads):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "1"])
    assert e.value.code == 2 and "give --out and/or --ship" in capsys.readouterr().err


# ------------------------------------------------------------------------ demo
def test_diverged_rule():
    from fastint.demo import diverged
    assert diverged(30.0, 0.1, 2.0) and diverged(None, 474.0, 2.0) and diverged(float("nan"), 0.1, 2.0)
    assert diverged(0.1, float("inf"), 2.0)
    assert not diverged(0.01, 0.05, 2.0) and not diverged(None, 1.9, 2.0)


def test_toy_demo_marks_adjusted_nfe_and_diverged_rows():
    from fastint.demo import run_demo
    lines = []
    rows = run_demo(("psld",), (4,), batch=16, progress=False, out=lines.append)
    sde = fastint.PSLD()
    data = GaussianMixture.default(sde).sample_data(16, generator=torch.Generator().manual_seed(1))
    scale = float(data.double().flatten(1).pow(2).sum(1).mean().sqrt())
    printed = {(l.split()[1], int(l.split()[2])): l for l in lines if l.startswith("psld ") and "DOP853" not in l}
    assert len(printed) == len(rows)
    for _, method, nfe, err, sw2, _ in rows:
        calls = METHODS[method].calls_per_step
        assert nfe == (3 // calls) * calls + 1  # whole steps + the denoising call, at most 4
        line = printed[(method, nfe)]
        assert line.rstrip().endswith("<- diverged") == (sw2 > scale or (err is not None and err > scale))
        assert ("  *" in line) == (nfe != 4)
    note = next(l for l in lines if l.startswith("* NFE adjusted"))
    assert "nse (2/step) 4->3" in note and "nvv" not in note  # nvv: 1 step of 3 calls + 1 is exactly 4


def test_vp_image_demo_uses_the_recommended_vp_sampler(tmp_path, capsys):
    """The README's VP recommendation, spelled out here: conj_ms, data prediction in log-SNR, the
    'leading' grid to t = 0.1, then the denoising call; at 5 calls (below k3_below=11) k=3 without
    the corrector; and a progress bar when asked."""
    from fastint.demo import run_image_demo
    from fastint.models.checkpoint import load_checkpoint
    rows = run_image_demo("vp", nfe=5, n_samples=16, out_png=None, log=lambda s: None, progress=True)
    assert rows[0]["method"] == "conj_ms" and rows[0]["nfe"] == 5
    model, sde, ck = load_checkpoint("vp")
    zT = sde.prior_sample((16, *ck["data"]["shape"]), generator=torch.Generator().manual_seed(0))
    x = fastint.Sampler(sde, "conj_ms", nfe=5, grid="leading", t_eps=0.1, denoise=True, k=3, predict="x0",
                        interp="logsnr").sample(model, zT)
    torch.testing.assert_close(rows[0]["x"], x)
    assert "fastint conj_ms" in capsys.readouterr().err  # the tqdm bar (stderr)


# ------------------------------------------------------------------------ bench
def _result(fraction, median_over_min=1.2):
    case = lambda name: {"name": name, "fraction_of_copy": fraction,  # noqa: E731
                         **{k: {"min_s": 1e-4, "median_s": 1e-4 * median_over_min} for k in ("fused", "eager", "copy")}}
    return {"machine": {"threads": 2, "nproc": 2}, "loadavg_before": [6.5, 6.0, 5.0],
            "cases": [case("vp-ddim 64K float32 contiguous"), case("psld-ms3 64K float32 contiguous")]}


def test_bench_warnings():
    assert bench.timing_warnings(_result(0.6)) == []
    w = bench.timing_warnings(_result(2.4))
    assert "2 of 2 cases" in w[0] and "240 % of copy bandwidth" in w[0] and "copy roof" in w[0]
    assert "load average 6.50/6.00/5.00" in w[-1] and "--threads 1" in w[-1]
    w = bench.timing_warnings(_result(0.6, median_over_min=5.0))
    assert len(w) == 2 and "median call time above 3x" in w[0]
    one = _result(1.5)
    one["machine"]["threads"] = 1
    assert "--threads 1" not in bench.timing_warnings(one)[-1]  # already at 1: only an idle machine helps


def test_bench_cli_prints_the_warning(monkeypatch, tmp_path, capsys, keep_threads):
    seen = {}

    def fake_run_bench(cases, threads=None, **kw):
        seen["threads"] = torch.get_num_threads()
        res = _result(1.37)
        res.update(wall_s=1.0, loadavg_after=None)
        res["machine"].update(cpu="cpu", torch=torch.__version__, cpu_capability="x")
        for c in res["cases"]:
            c.update(copy_gbps=1.0, speedup_vs_eager=0.02, speedup_vs_compile=None)
            c["fused"]["gbps"] = 1.37
        return res

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert main(["bench", "--quick", "--threads", "2", "--out", str(tmp_path / "b.json"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert seen["threads"] == 2
    assert "fastint bench: warning: 2 of 2 cases measured the fused op above the copy roof (up to 137 %" in err


# ------------------------------------------------------------------------ sample
@pytest.mark.parametrize("extra, message", [
    (["--process", "psld"], "--process psld would be ignored with --checkpoint"),
    (["--dim", "3"], "--dim 3 would be ignored with --checkpoint"),
    (["--process", "cld", "--dim", "4"], "--process cld and --dim 4"),
])
def test_sample_refuses_flags_a_checkpoint_ignores(extra, message, tmp_path, capsys, keep_threads):
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", "psld", *extra, "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_methods_lists_flow_interp_choices_that_the_sampler_accepts(capsys):
    """The FlowMatch interp line names exactly the choices Sampler(FlowMatch) accepts."""
    import re

    from fastint.cli import main
    main(["methods"])
    text = capsys.readouterr().out
    m = re.search(r"on FlowMatch: interp='(\w+)' \(([\w|]+)\)", text)
    assert m, text
    listed = m.group(2).split("|")
    assert m.group(1) in listed
    for interp in listed + ["t", "flow", "flow2"]:
        try:
            fastint.Sampler(fastint.FlowMatch(3.0), "conj_ms", nfe=6, interp=interp)
            ok = True
        except ValueError:
            ok = False
        assert ok == (interp in listed), interp
