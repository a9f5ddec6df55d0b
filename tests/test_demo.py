"""`fastint demo`: the PNG writer, the recommended-method fallback, the image demo end to end, --toy."""
import struct
import zlib

import pytest
import torch

from fastint import METHODS
from fastint.cli import main
from fastint.demo import RECOMMENDED, fit_nfe, image_grid, recommended_method, run_image_demo, write_png

pytest.importorskip("sklearn")


def read_png(path):
    """Decode an 8-bit grayscale, non-interlaced PNG with filter 0 rows (what write_png makes)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[i * (w + 1):(i + 1) * (w + 1)] for i in range(h)]
    assert depth == 8 and color == 0 and all(r[0] == 0 for r in rows)
    return torch.tensor([list(r[1:]) for r in rows], dtype=torch.uint8)


def test_png_roundtrip(tmp_path):
    img = torch.randint(0, 256, (7, 13), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(read_png(write_png(tmp_path / "a.png", img)), img)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", img.float())


def test_image_grid_layout():
    x = torch.full((3, 1, 8, 8), -1.0)
    x[1] = 1.0
    g = image_grid(x, rows=2, scale=2, pad=1)
    assert g.shape == (2 * 17 + 1, 2 * 17 + 1)
    assert g[1, 1] == 0 and g[1, 18] == 255 and g[18, 1] == 0  # tiles 0, 1, 2; padding white


def test_recommended_method_falls_back():
    assert recommended_method({"lambda_ddim": 1}) == "lambda_ddim"
    assert recommended_method({RECOMMENDED[0]: 1, "lambda_ddim": 1}) == RECOMMENDED[0]
    assert recommended_method() in METHODS
    assert fit_nfe("euler", 10) == 10


def test_image_demo_writes_png_and_scores(tmp_path):
    lines = []
    out = tmp_path / "demo.png"
    rows = run_image_demo("psld", nfe=6, n_samples=32, out_png=str(out), grid_rows=4, log=lines.append)
    assert [r["method"] for r in rows] == [recommended_method(), "euler"]
    assert all(r["fd"] >= 0 and r["wall_s"] > 0 for r in rows)
    img = read_png(out)
    assert img.shape == (4 * 33 + 1, 4 * 33 + 1)
    assert any("real digits" in l for l in lines)


def test_cli_toy_and_errors(capsys):
    assert main(["demo", "--toy", "--process", "vp", "--nfe", "7", "--batch", "16"]) == 0
    assert "8-mode Gaussian mixture" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--samples", "1"])
    with pytest.raises(SystemExit):
        main(["demo", "--checkpoint", "classifier"])
    assert "is not a denoiser" in capsys.readouterr().err


def test_demo_compares_with_the_best_diffusers_peer():
    """On the VP digits model at the same NFE and draws: fastint's recommended Sampler, its drop-in
    scheduler and diffusers' DPM-Solver++ 2M and UniPC bh2, the best peer marked."""
    pytest.importorskip("diffusers")
    from fastint.demo import compare_with_peers

    lines = []
    rows = compare_with_peers("vp", nfe=5, n_samples=64, log=lines.append)
    assert [r["method"] for r in rows] == ["fastint Sampler (recommended)", "fastint drop-in (recommended)",
                                           "fastint drop-in (defaults)",
                                           "DPM-Solver++ 2M", "UniPC bh2"]
    assert all(0 < r["fd"] < 50 for r in rows)
    # the recommended drop-in takes the recommended Sampler's knots: the same samples to float32 rounding
    assert abs(rows[0]["fd"] - rows[1]["fd"]) < 0.01 * rows[0]["fd"]
    best = min(rows[3:], key=lambda r: r["fd"])
    assert sum("<- best diffusers peer" in line for line in lines) == 1
    assert any(best["method"] in line and "<- best" in line for line in lines)
    with pytest.raises(ValueError, match="VP checkpoint"):
        compare_with_peers("psld", nfe=5, n_samples=8, log=lines.append)


def test_flow_peer_comparison_runs():
    pytest.importorskip("diffusers")
    from fastint.demo import compare_flow_with_peers

    lines = []
    rows = compare_flow_with_peers(nfe=8, n_samples=32, log=lines.append)
    assert [r["method"] for r in rows][0].startswith("fastint") and len(rows) == 4
    assert all(r["rms"] == r["rms"] and r["nfe"] == 8 for r in rows)
    euler = next(r for r in rows if r["method"] == "FlowMatch Euler")
    assert rows[0]["rms"] < 0.7 * euler["rms"]  # the drop-in beats the pipeline's own Euler on a learned model
    assert any("best diffusers peer" in line for line in lines)


@pytest.mark.parametrize("args,message", [
    (["--process", "vp"], "--process is for --toy only"),
    (["--grid", "uniform", "--batch", "8"], "--batch, --grid are for --toy only"),
    (["--nfe", "10,20"], "one --nfe for the image demo"),
    (["--toy", "--checkpoint", "vp"], "--checkpoint is for the image demo only"),
    (["--toy", "--samples", "9", "--no-peers"], "--samples, --no-peers are for the image demo only"),
])
def test_demo_refuses_the_other_modes_flags(args, message, capsys):
    """Nothing given to `fastint demo` is ignored silently: each mode refuses the other's flags."""
    with pytest.raises(SystemExit) as e:
        main(["demo", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
