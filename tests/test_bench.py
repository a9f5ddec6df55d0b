"""`fastint bench` (fastint/bench.py): it runs at a tiny size and writes sane JSON.

No timing assertions: speed is shown by the benchmarks, never asserted in tests.
"""
import json
import math

import pytest
import torch

from fastint import bench
from fastint.cli import main


def _check_timing(t):
    assert t["min_s"] > 0 and t["median_s"] >= t["min_s"] and math.isfinite(t["gbps"]) and t["gbps"] > 0


def test_cli_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--quick", "--sizes", "4K", "--no-compile", "--min-time", "0.002", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "x eager" in printed and "psld-ms3 4K float32 contiguous" in printed
    res = json.loads(out.read_text())
    assert {"machine", "cases", "copy_gbps_max", "loadavg_before", "loadavg_after", "wall_s"} <= set(res)
    assert res["machine"]["threads"] >= 1
    assert len(res["cases"]) == len(bench.FAMILIES) * len(bench.PROCESSES)
    for c in res["cases"]:
        assert c["size"] == 4096 and c["shape"][1] == bench.CHANNELS and math.prod(c["shape"]) == 4096
        assert c["bytes"] == (2 + c["K"]) * 4096 * 4
        for impl in ("fused", "eager", "copy"):
            _check_timing(c[impl])
        assert c["compile"] is None and "disabled" in c["compile_error"] and c["speedup_vs_compile"] is None
        assert c["speedup_vs_eager"] > 0 and c["fraction_of_copy"] > 0 and math.isfinite(c["fraction_of_copy"])
        assert c["copy_gbps"] == c["copy"]["gbps"]


@pytest.mark.parametrize("family", list(bench.FAMILIES))
@pytest.mark.parametrize("process", list(bench.PROCESSES))
@pytest.mark.parametrize("dtype", list(bench.DTYPES))
@pytest.mark.parametrize("layout", list(bench.LAYOUTS))
def test_eager_step_is_the_op(family, process, dtype, layout):
    """The eager twin computes the op's update (the benchmark compares like with like)."""
    case = bench.Case(process, family, 1024, dtype, layout)
    z, eps, coef = case.inputs("cpu")
    if case.noisy:  # same update, noise supplied as a tensor to both
        torch.manual_seed(0)
        got = bench.eager_step(z, eps, coef, 1, case.dim, True)
        torch.manual_seed(0)
        xi = torch.randn_like(z.float())  # as eager_step draws it (in memory order)
        want = torch.ops.fastint.step(z, eps, coef, 1, case.dim, xi, None, 0)
    else:
        got = bench.eager_step(z, eps, coef, 1, case.dim, False)
        want = bench.fused_step(z, eps, coef, 1, case.dim, False)
    tol = 1e-5 if dtype == "float32" else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_run_case_records_compile(monkeypatch):
    """With compile on, the record carries the compiled time (torch.compile stubbed: no C++ build here)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    rec = bench.run_case(bench.Case("psld", "ddim", 1024, "bfloat16", "channels_last"), min_time=0.002)
    _check_timing(rec["compile"])
    assert rec["compile"]["compile_s"] > 0 and rec["speedup_vs_compile"] > 0 and "compile_error" not in rec
    assert "fastint bench" in bench.format_table({"machine": bench.machine_info("cpu"), "cases": [rec]})


@pytest.mark.parametrize("argv, msg", [
    (["--sizes", "3x"], "size '3x'"),
    (["--sizes", "100"], "multiple of 512"),
    (["--sizes=-4K"], "positive"),
    (["--dtypes", "float64"], "dtypes: unknown 'float64'"),
    (["--layouts", "nhwc,strided"], "layouts: unknown 'strided'"),
    (["--families", "rk4"], "families: unknown 'rk4'"),
    (["--processes", "ve"], "processes: unknown 've'"),
    (["--quick", "--full"], "exclude each other"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--min-time", "0"], "--min-time must be > 0"),
    (["--device", "tpu"], "--device"),
])
def test_cli_rejects_bad_input(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv, "--no-progress"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_sizes_and_cases():
    assert [bench.parse_size(s) for s in ("16K", "1M", "32M", "4096")] == [16384, 1 << 20, 32 << 20, 4096]
    assert bench.state_shape(1 << 20) == (128, 8, 32, 32) and bench.state_shape(4096) == (8, 8, 8, 8)
    assert bench.parse_dtypes("bf16,fp32,bf16") == ["bfloat16", "float32"]
    assert len(bench.default_cases()) == 17
