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
