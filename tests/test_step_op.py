"""The fused step op against its plain-PyTorch reference, for both kernels.

Backends: "cpu" is the C++ kernel behind torch.ops.fastint.step on CPU tensors (marked
cpu_kernel); "triton" is the Triton launcher, on CUDA tensors when a GPU is present and
otherwise on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py; small sizes).

Accuracy bound: the reference is evaluated in float64 (value r) and on absolute values
(scale a, the sum of |terms|). An fp32 evaluation (at most 10 products, summed in any
order) is within d = 16 u a (u = 2^-24) of r, and rounding it to nearest in the storage dtype adds half
an ulp:  |out - r| <= ulp_dtype(|r| + d) / 2 + d, plus 1e-5 |S| for in-kernel Philox,
whose fp32 log/sqrt/cos/sin differ from the reference's float64 Box-Muller by a few ulps.
A truncating conversion (errors up to one ulp) fails this bound.
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import fastint  # noqa: F401  (loads the extension, registers the CUDA and fake kernels)
from fastint.ops import check_step_args, philox_normals, step_reference
from fastint.ops import step as step_op
from fastint.ops.step_reference import philox4x32, philox_words

pytest.importorskip("triton", reason="this module also runs the Triton kernel (interpreted on CPU); CPU-only "
                    "installs have no triton")
from fastint.ops.step_triton import collapse_dims, step_triton  # noqa: E402

import triton
import triton.language as tl

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [pytest.param("cpu", marks=pytest.mark.cpu_kernel), "triton"]
U32 = 2.0**-24


def device_of(backend):
    return "cpu" if backend == "cpu" else TRITON_DEVICE


def run(backend, z, eps, coef, step, dim, noise=None, seed=None, offset=0):
    if backend == "cpu":
        return torch.ops.fastint.step(z, list(eps), coef, step, dim, noise, seed, offset)
    # block 256: the test sizes span several programs and end in a partial block
    return step_triton(z, eps, coef, step, dim, noise, seed, offset, block=256)


# ----------------------------------------------------------------------------- inputs


def make_tensor(shape, dtype, layout, gen, device):
    """Standard normals of ``shape`` stored with the given layout (values independent of it)."""
    shape = tuple(shape)
    if layout == "contiguous":
        t = torch.randn(shape, generator=gen)
    elif layout == "channels_last":
        t = torch.randn(shape, generator=gen)
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]
        t = t.to(memory_format=fmt)
    elif layout == "transposed":  # last two dims swapped in memory
        t = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=gen).transpose(-1, -2)
    elif layout == "sliced":  # storage offset, batch stride and a strided last dim
        t = torch.randn((shape[0] + 1,) + shape[1:-1] + (2 * shape[-1] + 1,), generator=gen)[1:, ..., 1::2]
    else:
        raise AssertionError(layout)
    assert t.shape == shape
    return t.to(dtype=dtype, device=device)


def make_args(shape, dim, dtype, k, device, seed=0, z_layout="contiguous", eps_layouts=None,
              noise_mode="philox", noise_layout="contiguous", noise_dtype=torch.float32, rows=5, extra_cols=3):
    """Random state, eps history, coefficient table (random rows), step index and noise."""
    gen = torch.Generator().manual_seed(seed)
    eps_layouts = eps_layouts or ["contiguous"] * k
    z = make_tensor(shape, dtype, z_layout, gen, device)
    eps = [make_tensor(shape, dtype, eps_layouts[j], gen, device) for j in range(k)]
    coef = torch.randn(rows, 7 + 4 * k + extra_cols, generator=gen).to(device)
    step = int(torch.randint(rows, (1,), generator=gen))
    noise = make_tensor(shape, noise_dtype, noise_layout, gen, device) if noise_mode == "tensor" else None
    philox_seed = int(torch.randint(2**62, (1,), generator=gen)) if noise_mode == "philox" else None
    offset = int(torch.randint(2**40, (1,), generator=gen)) if noise_mode == "philox" else 0
    return z, eps, coef, step, dim, noise, philox_seed, offset


def ulp(v, dtype):
    """Spacing of ``dtype`` numbers at the magnitudes v >= 0 (float64 tensor)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(torch.clamp(v, min=fi.tiny))
    return fi.eps * torch.ldexp(torch.ones_like(v), e - 1)


def assert_matches_reference(out, args):
    z, eps, coef, step, dim, noise, seed, offset = args
    assert out.dtype == z.dtype and out.shape == z.shape and out.device == z.device
    assert out.stride() == torch.empty_like(z).stride()
    philox = noise is None and seed is not None
    if philox:
        noise = philox_normals(seed, offset, z.shape, dim, z.device)
    f64 = dict(compute_dtype=torch.float64, out_dtype=torch.float64)
    ref = step_reference(z, eps, coef, step, dim, noise, **f64)
    absn = noise.abs() if noise is not None else None
    scale = step_reference(z.abs(), [e.abs() for e in eps], coef.abs(), step, dim, absn, **f64)
    delta = 16 * U32 * scale
    tol = 0.5 * ulp(ref.abs() + delta, z.dtype) + delta
    if philox:
        zeros = torch.zeros_like(z)
        weight = step_reference(zeros, [zeros] * len(eps), coef.abs(), step, dim, torch.ones_like(z), **f64)
        tol = tol + 1e-5 * weight
    err = (out.double() - ref).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"max excess {float((err - tol).flatten()[worst]):.3g}: out {float(out.flatten()[worst])} "
        f"vs reference {float(ref.flatten()[worst])} (tol {float(tol.flatten()[worst]):.3g})"
    )


# ------------------------------------------------------------------ reference agreement

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
def test_matches_reference(backend, dtype, dim, noise_mode):
    args = make_args((3, dim * 5, 7, 9), dim, dtype, 2, device_of(backend), seed=11, noise_mode=noise_mode)
    assert_matches_reference(run(backend, *args), args)


LAYOUTS = {
    # name: (z layout, eps layouts, noise mode, noise layout, noise dtype, dtype)
    "channels_last": ("channels_last", ["channels_last"] * 2, "philox", None, None, torch.float16),
    "transposed": ("transposed", ["transposed"] * 2, "tensor", "transposed", torch.float32, torch.float32),
    "sliced": ("sliced", ["sliced"] * 2, "philox", None, None, torch.bfloat16),
    "eps_unlike_z": ("channels_last", ["sliced", "contiguous"], "tensor", "transposed", torch.float64, torch.float32),
    "z_sliced_eps_cl": ("sliced", ["channels_last", "transposed"], "tensor", "channels_last", torch.float16,
                        torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dim", [1, 2])
def test_layouts_match_reference(backend, layout, dim):
    z_l, eps_l, mode, noise_l, noise_dt, dtype = LAYOUTS[layout]
    args = make_args((2, dim * 3, 5, 6), dim, dtype, 2, device_of(backend), seed=12, z_layout=z_l,
                     eps_layouts=eps_l, noise_mode=mode, noise_layout=noise_l, noise_dtype=noise_dt)
    assert_matches_reference(run(backend, *args), args)


SHAPES = [  # (shape, dim)
    ((3, 10, 7, 9), 2),
    ((1, 2, 1, 1), 2),
    ((4, 6), 2),  # a 2-D [B, 2C] state
    ((2, 4, 3, 5, 6), 2),  # 5-D
    ((3, 5, 7, 9), 1),  # odd channel count is fine for dim 1
    ((1, 1), 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=[f"{s}-dim{d}" for s, d in SHAPES])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_shapes_and_history_match_reference(backend, shape, dim, k):
    args = make_args(shape, dim, torch.float32, k, device_of(backend), seed=13 + k,
                     eps_layouts=["sliced", "contiguous", "transposed"][:k])
    assert_matches_reference(run(backend, *args), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_first_and_last_row_and_empty(backend, dim):
    dev = device_of(backend)
    for step in (0, 4):
        z, eps, coef, _, _, noise, seed, offset = make_args((2, dim * 3, 4, 5), dim, torch.float32, 1, dev)
        args = (z, eps, coef, step, dim, noise, seed, offset)
        assert_matches_reference(run(backend, *args), args)
    z = torch.zeros(0, dim * 3, 4, device=dev)
    out = run(backend, z, [z], torch.zeros(1, 11, device=dev), 0, dim, None, 5)
    assert out.shape == z.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank5_fallback(backend):
    """Five mutually non-mergeable dims take the documented contiguous-copy path."""
    base = torch.randn(2, 6, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    z = base.permute(0, 1, 3, 2, 4).to(device_of(backend))
    x_shape = (2, 3) + tuple(z.shape[2:])
    assert len(collapse_dims(x_shape, [z.stride()])[0]) == 5
    gen = torch.Generator().manual_seed(4)
    eps = [torch.randn(z.shape, generator=gen).to(z.device)]
    coef = torch.randn(3, 11, generator=gen).to(z.device)
    args = (z, eps, coef, 1, 2, None, 99, 7)
    assert_matches_reference(run(backend, *args), args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_64bit_index_path(layout, monkeypatch):
    """The 64-bit index arithmetic used from 2**31 pixels on, forced at a small size."""
    module = importlib.import_module("fastint.ops.step_triton")  # fastint.ops.step_triton is the function
    monkeypatch.setattr(module, "INT32_INDEX_LIMIT", 0)
    args = make_args((2, 6, 5, 7), 2, torch.float32, 2, TRITON_DEVICE, seed=31, z_layout=layout)
    assert_matches_reference(run("triton", *args), args)


def test_collapse_dims():
    # contiguous [B, 2C, H, W]: the x part is [B, C*H*W] with batch stride 2C*H*W
    z = torch.empty(2, 6, 4, 5)
    assert collapse_dims((2, 3, 4, 5), [z.stride()]) == ([2, 60], [[120, 1]])
    # channels_last: only H and W merge
    z = z.to(memory_format=torch.channels_last)
    assert collapse_dims((2, 3, 4, 5), [z.stride()]) == ([2, 3, 20], [[120, 1, 6]])
    # a contiguous operand next to a channels_last one merges nothing that either forbids
    c = torch.empty(2, 6, 4, 5)
    assert collapse_dims((2, 3, 4, 5), [z.stride(), c.stride()]) == ([2, 3, 20], [[120, 1, 6], [120, 20, 1]])
    # size-1 dims vanish; all size 1 leaves one dim
    assert collapse_dims((1, 3, 1, 5), [(99, 5, 77, 1)]) == ([15], [[1]])
    assert collapse_dims((1, 1), [(2, 1)]) == ([1], [[0]])


# ----------------------------------------------------------------------------- Philox

# Random123's known-answer vectors for philox4x32-10 (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _randint4x_kernel(out_ptr, ctr_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    r0, r1, r2, r3 = tl.randint4x(seed, tl.load(ctr_ptr + i, mask=mask))
    tl.store(out_ptr + 4 * i + 0, r0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _randn_pair_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    """Pair offset + i of the noise stream with triton.language.random's own uniform and
    Box-Muller: words (r0, r1) of counter p // 2 for even p, (r2, r3) for odd p (offset >= 0)."""
    i = tl.arange(0, BLOCK)
    mask = i < n
    p = offset + i.to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, p // 2)
    odd = (p % 2) == 1
    u1 = tl.random.uint_to_uniform_float(tl.where(odd, r2, r0))
    u2 = tl.random.uint_to_uniform_float(tl.where(odd, r3, r1))
    n1, n2 = tl.random.pair_uniform_to_normal(u1, u2)
    tl.store(out_ptr + 2 * i, n1, mask=mask)
    tl.store(out_ptr + 2 * i + 1, n2, mask=mask)


COUNTERS = [0, 1, 5, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 123, 2**63 - 1, -1, -(2**32)]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**63 - 1])
def test_philox_words_match_triton(seed):
    ctr = torch.tensor(COUNTERS, dtype=torch.int64)
    out = torch.empty(len(COUNTERS), 4, dtype=torch.int32, device=TRITON_DEVICE)
    _randint4x_kernel[(1,)](out, ctr.to(TRITON_DEVICE), seed, len(COUNTERS), BLOCK=16)
    got = out.cpu().to(torch.int64) & 0xFFFFFFFF
    want = torch.stack(philox_words(seed, ctr), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed,offset", [(7, 0), (2**40 + 3, 2**32 - 17)])
def test_philox_normals_match_triton_randn(seed, offset):
    """Uniforms and Box-Muller as in triton.language.random (fp32 there, float64 here); dim 1
    takes the cos and sin halves of pair c >> 1 in turn."""
    n = 300
    out = torch.empty(n, 2, device=TRITON_DEVICE)
    _randn_pair_kernel[(1,)](out, seed, offset, n, BLOCK=512)
    ref = philox_normals(seed, offset, (1, 2 * n), 2).reshape(2, n).t()
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-5)
    flat = philox_normals(seed, 2 * offset, (1, 1, 2 * n), 1).reshape(n, 2)  # normals 2 offset ..
    torch.testing.assert_close(out.cpu(), flat, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed,offset", [(7, 0), (2**40 + 3, 2**32 - 17)])
def test_triton_philox_noise_is_triton_randn(seed, offset):
    """With P = Q = 0 and S = I the kernel returns exactly Triton's own Box-Muller pairs: pair c
    as (xi_x, xi_m) for dim 2, their halves in turn for dim 1."""
    n = 600
    pairs = torch.empty(n, 2, device=TRITON_DEVICE)
    _randn_pair_kernel[(1,)](pairs, seed, offset, n, BLOCK=1024)
    xi = run("triton", *noise_only_args((2, 2, n // 2), 2, TRITON_DEVICE, seed, offset))
    assert torch.equal(xi[:, 0].flatten(), pairs[:, 0]) and torch.equal(xi[:, 1].flatten(), pairs[:, 1])
    pairs1 = torch.empty(n // 2, 2, device=TRITON_DEVICE)
    _randn_pair_kernel[(1,)](pairs1, seed, offset // 2, n // 2, BLOCK=512)
    xi1 = run("triton", *noise_only_args((2, 1, n // 2), 1, TRITON_DEVICE, seed, 2 * (offset // 2)))
    assert torch.equal(xi1.flatten(), pairs1.flatten())


def noise_only_args(shape, dim, device, seed, offset):
    """P = Q = 0 and S = I, so the output is the noise itself."""
    z = torch.zeros(shape, device=device)
    coef = torch.zeros(1, 11, device=device)
    coef[0, 4] = coef[0, 6] = 1.0
    return z, [z], coef, 0, dim, None, seed, offset


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_statistics(backend):
    """Mean, variance, kurtosis, xi_x-xi_m and neighbour correlation within 5 standard errors."""
    xi = run(backend, *noise_only_args((2, 2, 96, 96), 2, device_of(backend), 2024, 3)).double().cpu()
    x, m = xi[:, 0].flatten(), xi[:, 1].flatten()
    n = x.numel()
    for v in (x, m):
        assert abs(float(v.mean())) < 5 / math.sqrt(n)
        assert abs(float(v.var()) - 1) < 5 * math.sqrt(2 / n)
        assert abs(float((v**4).mean()) - 3) < 5 * math.sqrt(96 / n)
        assert abs(float((v[1:] * v[:-1]).mean())) < 5 / math.sqrt(n)
    assert abs(float((x * m).mean())) < 5 / math.sqrt(n)
    assert float((x.abs() > 3).double().mean()) == pytest.approx(2.7e-3, abs=5 * math.sqrt(2.7e-3 / n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_philox_counter_is_offset_plus_logical_index(backend, dim):
    dev = device_of(backend)
    shape = (2, dim * 3, 5, 7)
    c_half = 3 * 5 * 7 * 2

    def noise(seed, offset):
        xi = run(backend, *noise_only_args(shape, dim, dev, seed, offset)).cpu()
        return xi[:, :3].flatten() if dim == 2 else xi.flatten()

    a = noise(5, 2**32 - 40)
    assert torch.equal(noise(5, 2**32 - 40), a)  # reproducible
    shifted = noise(5, 2**32 - 40 + 17)  # counters cross 2**32 inside the tensor
    assert torch.equal(shifted[: c_half - 17], a[17:])
    for other in (noise(5, 2**32 - 40 + c_half), noise(6, 2**32 - 40), noise(5, 2**33 - 40)):
        assert not torch.isclose(other, a).any()
    ref = philox_normals(5, 2**32 - 40, shape, dim)
    ref = ref[:, :3].flatten() if dim == 2 else ref.flatten()
    assert torch.isclose(a, ref, rtol=0, atol=1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_philox_noise_is_layout_invariant(backend, dim):
    args = make_args((2, dim * 4, 5, 6), dim, torch.float32, 2, device_of(backend), seed=21)
    z, eps, *rest = args
    out = run(backend, *args)
    cl = torch.channels_last
    out_cl = run(backend, z.to(memory_format=cl), [e.to(memory_format=cl) for e in eps], *rest)
    out_t = run(backend, z.transpose(-1, -2).contiguous().transpose(-1, -2), eps, *rest)
    assert out_cl.is_contiguous(memory_format=cl)
    for other in (out_cl, out_t):
        if backend == "triton":
            assert torch.equal(other, out)  # same fp32 arithmetic per element
        else:  # vectorised and scalar code paths may differ in the last ulp
            torch.testing.assert_close(other, out, rtol=4 * U32, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_tensor_takes_precedence_over_seed(backend):
    z, eps, coef, step, dim, noise, _, _ = make_args((2, 4, 3, 3), 2, torch.float32, 1, device_of(backend),
                                                     noise_mode="tensor")
    both = run(backend, z, eps, coef, step, dim, noise, 123, 0)
    assert torch.equal(both, run(backend, z, eps, coef, step, dim, noise, None, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layout(backend):
    dev = device_of(backend)
    z4 = torch.randn(2, 4, 3, 5, device=dev).to(memory_format=torch.channels_last)
    z5 = torch.randn(2, 4, 3, 5, 2, device=dev).to(memory_format=torch.channels_last_3d)
    zs = torch.randn(2, 4, 3, 10, device=dev)[..., ::2]  # not dense: output is a fresh dense tensor
    for z, fmt in ((z4, torch.channels_last), (z5, torch.channels_last_3d), (zs, torch.contiguous_format)):
        out = run(backend, z, [z], torch.randn(2, 11, device=dev), 1, 2)
        assert out.is_contiguous(memory_format=fmt)
        assert out.stride() == torch.empty_like(z).stride()


# ----------------------------------------------------------------------------- errors


def _err_cases():
    def base(dev, dtype=torch.float32, channels=4, k=1):
        z = torch.randn(2, channels, 3, 3, dtype=dtype, device=dev)
        return dict(z=z, eps=[torch.randn_like(z) for _ in range(k)], coef=torch.randn(4, 7 + 4 * k, device=dev),
                    step=1, dim=2, noise=None, seed=None, offset=0)

    def upd(**changes):
        def build(dev):
            a = base(dev)
            for key, f in changes.items():
                a[key] = f(a, dev)
            return a
        return build

    return {
        "z_float64": (upd(z=lambda a, d: a["z"].double(), eps=lambda a, d: [e.double() for e in a["eps"]]),
                      TypeError, r"\bz\b"),
        "z_int": (upd(z=lambda a, d: a["z"].int(), eps=lambda a, d: [e.int() for e in a["eps"]]),
                  TypeError, r"\bz\b"),
        "eps_dtype": (upd(eps=lambda a, d: [a["eps"][0].half()]), TypeError, r"\beps\b|eps\["),
        "coef_float64": (upd(coef=lambda a, d: a["coef"].double()), TypeError, r"\bcoef\b"),
        "noise_int": (upd(noise=lambda a, d: torch.ones_like(a["z"], dtype=torch.int32)), TypeError, r"\bnoise\b"),
        "z_1d": (upd(z=lambda a, d: a["z"].flatten(), eps=lambda a, d: [e.flatten() for e in a["eps"]]),
                 ValueError, r"\bz\b"),
        "eps_shape": (upd(eps=lambda a, d: [a["eps"][0][:, :, :2]]), ValueError, r"\beps\b|eps\["),
        "noise_shape": (upd(noise=lambda a, d: torch.randn(2, 4, 3, 2, device=d)), ValueError, r"\bnoise\b"),
        "step_too_large": (upd(step=lambda a, d: 4), ValueError, r"\bstep\b"),
        "step_negative": (upd(step=lambda a, d: -1), ValueError, r"\bstep\b"),
        "coef_too_narrow": (upd(coef=lambda a, d: torch.randn(4, 10, device=d)), ValueError, r"\bcoef\b"),
        "coef_1d": (upd(coef=lambda a, d: torch.randn(11, device=d)), ValueError, r"\bcoef\b"),
        "coef_not_contiguous": (upd(coef=lambda a, d: torch.randn(11, 4, device=d).t()), ValueError, r"\bcoef\b"),
        "odd_channels": (upd(z=lambda a, d: a["z"][:, :3], eps=lambda a, d: [e[:, :3] for e in a["eps"]]),
                         ValueError, r"\bz\b|channel"),
        "dim_3": (upd(dim=lambda a, d: 3), ValueError, r"\bdim\b"),
        "empty_eps": (upd(eps=lambda a, d: []), ValueError, r"\beps\b"),
        "coef_other_device": (upd(coef=lambda a, d: a["coef"].to("meta")), ValueError, r"\bcoef\b|device"),
        "negative_seed": (upd(seed=lambda a, d: -3), ValueError, r"\bseed\b"),
    }


ERR_CASES = _err_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ERR_CASES))
def test_bad_arguments(backend, case):
    build, exc, pattern = ERR_CASES[case]
    a = build(device_of(backend))
    with pytest.raises(exc, match=pattern):
        run(backend, a["z"], a["eps"], a["coef"], a["step"], a["dim"], a["noise"], a["seed"], a["offset"])


@pytest.mark.parametrize("case", ["z_int", "eps_shape", "step_too_large", "odd_channels", "empty_eps"])
def test_public_wrapper_validates(case):
    build, exc, pattern = ERR_CASES[case]
    a = build("cpu")
    with pytest.raises(exc, match=pattern):
        step_op(**a)


# --------------------------------------------------------- registration and torch.compile


def test_kernels_registered():
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fastint::step", key), key


def test_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(2, 6, 4, 5).to(memory_format=torch.channels_last).half()
        coef = torch.empty(3, 15)
        out = torch.ops.fastint.step(z, [z, z], coef, 2, 2, None, 1, 0)
        assert out.shape == z.shape and out.dtype == torch.float16
        assert out.stride() == z.stride()
        with pytest.raises(ValueError, match=r"\bstep\b"):
            torch.ops.fastint.step(z, [z, z], coef, 3, 2, None, 1, 0)


def _compiled_step(z, e0, e1, coef):
    # z' from a two-term history, then an ordinary op on the result
    return step_op(z, [e0, e1], coef, 1, 2, seed=3, offset=8) * 2.0


def test_compile_fullgraph_traces_without_graph_break():
    """Traced through the fake kernel (meta tensors), so this holds whatever the kernels do."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(_compiled_step, fullgraph=True, backend=backend)
    z = torch.empty(2, 4, 3, 3, device="meta")
    out = fn(z, torch.empty_like(z), torch.empty_like(z), torch.empty(2, 15, device="meta"))
    assert out.shape == z.shape and out.device.type == "meta"
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any(t in (torch.ops.fastint.step, torch.ops.fastint.step.default) for t in targets), targets


@pytest.mark.cpu_kernel
def test_compile_fullgraph_cpu_matches_eager():
    torch._dynamo.reset()
    fn = torch.compile(_compiled_step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    z, e0, e1 = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    coef = torch.randn(2, 15, generator=gen)
    torch.testing.assert_close(fn(z, e0, e1, coef), _compiled_step(z, e0, e1, coef), rtol=0, atol=0)
    ref = 2.0 * step_reference(z, [e0, e1], coef, 1, 2, seed=3, offset=8)
    torch.testing.assert_close(fn(z, e0, e1, coef), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
def test_opcheck_cpu(noise_mode):
    args = make_args((2, 4, 3, 5), 2, torch.float32, 2, "cpu", seed=9, z_layout="channels_last",
                     eps_layouts=["transposed", "contiguous"], noise_mode=noise_mode)
    torch.library.opcheck(torch.ops.fastint.step.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_check_step_args_returns_history_length():
    z = torch.zeros(1, 2, 3)
    assert check_step_args(z, [z, z, z], torch.zeros(1, 19), 0, 2) == 3


_COMPILE_FOR_CUDA = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastint.ops.step_triton import _step_kernel

st4 = ("i64", "i32", "i32", "i32")
for (dtype, dim, k, noise, keyed), arch in itertools.product(
        [("bf16", 2, 3, 2, False), ("fp32", 2, 2, 2, True), ("fp16", 1, 1, 1, False), ("fp32", 2, 2, 0, False)],
        [80, 90]):
    sig = dict(out_ptr="*" + dtype, z_ptr="*" + dtype, eps_ptrs=("*" + dtype,) * k,
               noise_ptr="*fp32" if noise == 1 else "constexpr", coef_ptr="*fp32",
               out_st=st4, z_st=st4, eps_st=(st4,) * k, noise_st=st4 if noise == 1 else "constexpr",
               out_m="i64", z_m="i64", eps_m=("i64",) * k, noise_m="i64",
               n="i64", size1="i32", size2="i32", size3="i32", row_stride="i32", step="i32",
               seed="i64", offset="i64", seed_ptr="*i64" if keyed else "constexpr",
               DIM="constexpr", K="constexpr", NOISE="constexpr", WIDE="constexpr", BLOCK="constexpr",
               SEED_T="constexpr")
    names = list(sig)
    const = dict(DIM=dim, K=k, NOISE=noise, WIDE=dim == 1, BLOCK=1024, SEED_T=keyed)
    if not keyed:
        const.update(seed_ptr=None)
    if noise != 1:
        const.update(noise_ptr=None, noise_st=None)
    src = ASTSource(fn=_step_kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options=dict(num_warps=4, enable_fp_fusion=False)).asm["ptx"]
    assert ".entry _step_kernel" in ptx, ptx[:200]
print("compiled")
"""


# ------------------------------------------------------------- Philox key from a device tensor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_seed_tensor_is_the_int_seed_read_on_the_device(backend, dim):
    """seed_tensor (int64 [1] on z's device) keys Philox exactly like the int seed, bit for bit,
    and takes precedence over it; a noise tensor still wins over both."""
    args = make_args((2, dim * 3, 5, 7), dim, torch.float32, 2, device_of(backend), seed=41, noise_mode="philox")
    z, eps, coef, step, dim, _, seed, offset = args
    key = torch.tensor([seed], dtype=torch.int64, device=z.device)
    by_int = run(backend, z, eps, coef, step, dim, None, seed, offset)
    if backend == "cpu":
        by_key = torch.ops.fastint.step(z, list(eps), coef, step, dim, None, None, offset, key)
        both = torch.ops.fastint.step(z, list(eps), coef, step, dim, None, seed + 1, offset, key)
    else:
        by_key = step_triton(z, eps, coef, step, dim, None, None, offset, key, block=256)
        both = step_triton(z, eps, coef, step, dim, None, seed + 1, offset, key, block=256)
    assert torch.equal(by_key, by_int) and torch.equal(both, by_int)
    assert_matches_reference(by_key, args)
    other = key + 1
    assert not torch.equal(step_reference(z, eps, coef, step, dim, seed_tensor=other, offset=offset),
                           step_reference(z, eps, coef, step, dim, seed_tensor=key, offset=offset))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, exc", [(lambda d: torch.tensor([3], dtype=torch.int32, device=d), TypeError),
                                      (lambda d: torch.tensor([3, 4], device=d), ValueError),
                                      (lambda d: torch.tensor([3], device="meta"), ValueError),
                                      (lambda d: 3, TypeError)], ids=["int32", "two", "device", "int"])
def test_seed_tensor_bad_arguments(backend, bad, exc):
    d = device_of(backend)
    z = torch.randn(2, 4, 3, device=d)
    coef = torch.randn(2, 11, device=d)
    call = (lambda k: torch.ops.fastint.step(z, [z], coef, 0, 2, None, None, 0, k)) if backend == "cpu" else \
        (lambda k: step_triton(z, [z], coef, 0, 2, None, None, 0, k))
    if backend == "cpu" and exc is TypeError and not isinstance(bad(d), torch.Tensor):
        exc = RuntimeError  # the dispatcher's own schema check for a non-tensor
    with pytest.raises(exc, match=r"seed_tensor|Tensor"):
        call(bad(d))
    with pytest.raises(exc if exc is not RuntimeError else TypeError, match=r"seed_tensor"):
        step_op(z, [z], coef, 0, 2, seed_tensor=bad(d))


@pytest.mark.cpu_kernel
def test_opcheck_cpu_seed_tensor():
    args = make_args((2, 4, 3, 5), 2, torch.float32, 2, "cpu", seed=19, noise_mode="philox")
    z, eps, coef, step, dim, _, seed, offset = args
    torch.library.opcheck(torch.ops.fastint.step.default,
                          (z, list(eps), coef, step, dim, None, None, offset, torch.tensor([seed])),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernel for real")
def test_triton_kernel_compiles_for_cuda():
    """The interpreter accepts code that the GPU compiler rejects: compile PTX offline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_CUDA], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
