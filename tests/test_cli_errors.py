"""`fastint` user errors are one line, `fastint <cmd>: error: ...`, exit code 2, no traceback
and no output file (issue "No silent NaN, no raw traceback", item 5, in part)."""
import os

import pytest

from fastint.cli import main


def _fails(argv, capsys, expect):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "\n".join(err)
    assert expect in err[-1] and err[-1].startswith("fastint "), err[-1]


@pytest.mark.parametrize("content,expect", [(os.urandom(1000), "not a readable checkpoint"),
                                            (b"", "not a readable checkpoint"),
                                            (b"PK\x03\x04truncated", "not a readable checkpoint")])
def test_bad_checkpoint_files(tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    out = tmp_path / "o.npz"
    _fails(["sample", "--checkpoint", str(bad), "--out", str(out), "--nfe", "3", "--no-progress"], capsys, expect)
    assert not out.exists()


@pytest.mark.parametrize("extra,expect", [
    (["--device", "meta"], "--device must be cpu or cuda"),
    (["--seed", str(2**70)], "--seed must fit in 64 bits"),
])
def test_bad_sample_arguments(tmp_path, capsys, extra, expect):
    _fails(["sample", "--out", str(tmp_path / "o.npz"), "--nfe", "3", "--batch", "2", "--no-progress", *extra],
           capsys, expect)


def test_cuda_on_a_cpu_build(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(["sample", "--device", "cuda", "--out", str(tmp_path / "o.npz"), "--nfe", "3", "--no-progress"],
           capsys, "no usable CUDA")


def test_output_path_checked_before_sampling(tmp_path, capsys):
    _fails(["sample", "--out", str(tmp_path / "missing" / "o.npz"), "--nfe", "3", "--no-progress"], capsys,
           "does not exist")
    (tmp_path / "d.npz").mkdir()
    _fails(["sample", "--out", str(tmp_path / "d.npz"), "--nfe", "3", "--no-progress"], capsys, "is a directory")


def test_demo_unknown_grid(capsys):
    _fails(["demo", "--toy", "--grid", "nope"], capsys, "grid must be one of")


# ------------------------------------------------------------------------ one line, naming the flag
def _one_line(argv, capsys):
    """The whole of stderr for a refused `fastint argv`: exactly one line, exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv,expect", [
    (["sample", "--nfe", "0"], "fastint sample: error: --nfe must lie in [1, 100000], got 0"),
    (["sample", "--nfe", "abc"], "fastint sample: error: argument --nfe: invalid int value: 'abc'"),
    (["sample", "--method", "foo"], "fastint sample: error: --method must be one of ["),
    (["sample", "--method", "sddim", "--process", "psld"], "fastint sample: error: --method 'sddim' is defined for "
     "VP only"),
    (["sample", "--grid", "foo"], "fastint sample: error: --grid must be one of ["),
    (["sample", "--method", "em", "--nfe", "1"], "fastint sample: error: --nfe=1 does not fit --method 'em'"),
    (["sample", "--option", "k=5", "--method", "conj_ms"],
     "fastint sample: error: --option k must be one of [1, 2, 3], got 5"),
    (["sample", "--option", "corrector=foo", "--method", "conj_ms"],
     "fastint sample: error: --option corrector must be one of ['none', 'start', 'every', 'inner'], got 'foo'"),
    (["sample", "--option", "lam=abc", "--method", "lambda_ddim"],
     "fastint sample: error: --option lam must be a number, got 'abc'"),
    (["sample", "--option", "foo=1"], "fastint sample: error: --option foo: method 'ddim' takes options []"),
    (["sample", "--option", "k=2", "--method", "cspsd", "--process", "psld"], "fastint sample: error: --option k: method 'cspsd' takes no "
     "options"),
    (["sample", "--option", "foo=1", "--method", "conj_ms"], "fastint sample: error: --option foo: method 'conj_ms' "
     "takes options ["),
    (["sample", "--option", "corrector=every", "--option", "k=3", "--method", "conj_ms"],
     "fastint sample: error: --option corrector='every' needs k <= 2"),
    (["sample", "--batch", "0"], "fastint sample: error: --batch must be >= 1"),
    (["sample", "--process", "ve"], "fastint sample: error: argument --process: invalid choice: 've'"),
    (["methods", "--threads", "0"], "fastint methods: error: --threads must be >= 1, got 0"),
    (["--threads", "0", "methods"], "fastint methods: error: --threads must be >= 1, got 0"),
    (["--threads", "x", "methods"], "fastint: error: argument --threads: expected an integer, got 'x'"),
    (["nosuch"], "fastint: error: argument command: invalid choice: 'nosuch'"),
    (["bench", "--min-time", "-1"], "fastint bench: error: --min-time must be > 0"),
    (["bench", "--quick", "--out", "{tmp}/nodir/b.json"], "fastint bench: error: --out '{tmp}/nodir/b.json': the directory"),
    (["train", "--steps", "0", "--out", "{tmp}/t.pt"], "fastint train: error: --steps must be a positive int, got 0"),
    (["train", "--ema", "2", "--steps", "1", "--out", "{tmp}/t.pt"], "fastint train: error: --ema must lie in [0, 1)"),
    (["train", "--ch", "0", "--steps", "1", "--out", "{tmp}/t.pt"], "fastint train: error: --ch must be >= 1, got 0"),
    (["train", "--ode-steps", "0", "--steps", "1", "--out", "{tmp}/t.pt"],
     "fastint train: error: --ode-steps must be >= 1, got 0"),
    (["train", "--ch-mult", "a,b", "--steps", "1", "--out", "{tmp}/t.pt"],
     "fastint train: error: --ch-mult: expected comma-separated integers, got 'a,b'"),
    (["train", "--lr", "-1", "--steps", "1", "--out", "{tmp}/t.pt"], "fastint train: error: --lr"),
    (["demo", "--toy", "--batch", "0"], "fastint demo: error: --batch must be >= 2"),
    (["demo", "--toy", "--process", "foo"], "fastint demo: error: --process: unknown ['foo']"),
    (["demo", "--toy", "--grid", "foo"], "fastint demo: error: --grid must be one of ["),
    (["demo", "--toy", "--nfe", "1"], "fastint demo: error: argument --nfe: every NFE must be >= 2"),
    (["demo", "--samples", "0", "--no-peers"], "fastint demo: error: --samples must be >= 2"),
    (["demo", "--process", "vp"], "fastint demo: error: --process is for --toy only"),
    (["demo", "--nfe", "10,20"], "fastint demo: error: one --nfe for the image demo"),
    (["demo", "--checkpoint", "nosuch", "--no-peers"], "fastint demo: error: --checkpoint: no checkpoint at 'nosuch'"),
    (["demo", "--method", "foo", "--no-peers", "--samples", "4"], "fastint demo: error: --method must be one of ["),
    (["demo", "--out", "{tmp}/missing/x.png", "--no-peers"], "fastint demo: error: --out "),
    (["train", "--resume", "{tmp}/nosuch.pt", "--out", "{tmp}/t.pt"], "fastint train: error: --resume: no checkpoint at"),
])
def test_usage_errors_are_one_line_naming_the_flag(argv, expect, tmp_path, capsys):
    if argv[0] == "sample":
        argv = [*argv, "--out", str(tmp_path / "s.npz"), "--no-progress"]
    line = _one_line([a.format(tmp=tmp_path) for a in argv], capsys)
    assert line.startswith(expect.format(tmp=tmp_path)), line
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "t.pt").exists()
    assert not (tmp_path / "nodir").exists()  # bench --out: refused, not a folder made for it


@pytest.mark.parametrize("argv,want", [(["--threads", "1", "methods"], 1), (["--threads", "1", "methods", "--threads", "2"], 2)])
def test_threads_before_the_command(argv, want, capsys):
    """`fastint --threads N methods` is the command's --threads (given after the command, that one wins)."""
    import torch

    before = torch.get_num_threads()
    try:
        main(argv)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert "conj_ms" in capsys.readouterr().out


def test_one_line_from_the_installed_command(tmp_path):
    """The console script itself: one line on stderr, exit code 2 (not only main() in-process)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("fastint")
    if not exe.exists():
        pytest.skip("no fastint console script next to this interpreter")
    r = subprocess.run([str(exe), "sample", "--nfe", "0", "--out", str(tmp_path / "s.npz")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.splitlines() == ["fastint sample: error: --nfe must lie in [1, 100000], got 0"]


# ------------------------------------------------------------------------ train: output paths before training
@pytest.mark.parametrize("flags", [["--out", "{missing}/x.pt"], ["--ship", "{missing}/x.pt"],
                                   ["--out", "{tmp}/ok.pt", "--ship", "{missing}/x.pt"],
                                   ["--out", "{tmp}", "--steps", "1"],
                                   ["--out", "{tmp}/newdir/"],  # a folder name: abspath drops the slash
                                   ["--arch", "classifier", "--ship", "{missing}/c.pt"]])
def test_train_output_paths_checked_before_training(flags, tmp_path, capsys, monkeypatch):
    import fastint.train

    def must_not_train(*a, **k):
        raise AssertionError("trained before checking the output paths")

    monkeypatch.setattr(fastint.train, "train_denoiser", must_not_train)
    monkeypatch.setattr(fastint.train, "train_classifier", must_not_train)
    argv = ["train", "--steps", "1", "--no-progress"] + [f.format(missing=tmp_path / "missing", tmp=tmp_path)
                                                          for f in flags]
    line = _one_line(argv, capsys)
    flag = "--ship" if "{missing}" in flags[-1] and flags[-2] == "--ship" else "--out"
    assert line.startswith(f"fastint train: error: {flag} "), line
    assert ("does not exist" in line) if "{missing}" in " ".join(flags) else ("is a directory" in line)
    assert not (tmp_path / "ok.pt").exists()


def test_error_lines_keep_the_users_path(tmp_path, capsys):
    """One line, but the path echoed back is the one given (its double space kept)."""
    path = str(tmp_path / "a  b" / "x.npz")
    line = _one_line(["sample", "--out", path, "--no-progress"], capsys)
    assert repr(path) in line and "does not exist" in line, line


def test_png_of_one_dimensional_data_is_refused_before_sampling(tmp_path, capsys):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--dim", "1", "--out", str(out), "--nfe", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "needs images or data with at least 2 dimensions" in captured.err
    assert "samples of shape" not in captured.out and not out.exists()  # nothing was sampled


@pytest.mark.parametrize("text,value", [("True", True), ("false", False), ("TRUE", True)])
def test_bool_options_from_the_command_line(tmp_path, capsys, text, value):
    import numpy as np

    out = tmp_path / "o.npz"
    assert main(["sample", "--method", "conj_ms", "--option", f"lower_final={text}", "--nfe", "6", "--batch", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert f"lower_final={value}" in capsys.readouterr().out
    assert eval(str(np.load(out)["options"])) == {"lower_final": value}


def test_flow_npz_records_the_shift(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "f.npz"
    assert main(["sample", "--checkpoint", "flow", "--shift", "3", "--method", "euler", "--nfe", "3", "--batch", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert "FlowMatch(shift=3.0)" in capsys.readouterr().out
    assert float(np.load(out)["shift"]) == 3.0
