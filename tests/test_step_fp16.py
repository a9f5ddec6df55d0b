"""float16 storage in the CPU step kernel, bit for bit.

The AVX2 and AVX-512 builds convert float16 runs with F16C (vcvtph2ps / vcvtps2ph), the baseline
build with scalar integer code. Every build computes the same float32 terms in the same order as
step_reference(compute_dtype=float32), so each output must equal torch's own float32 -> float16
cast of that float32 result, bit for bit (NaN only as NaN: payloads may differ). The inputs hold
every float16 bit pattern; the outputs hit ties, subnormals, overflow to inf and the values just
below it. Shapes and layouts reach each path of the kernel (direct runs, pixel-interleaved runs,
tile passes) with runs that end in a tail shorter than a vector.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastint.ops import step_reference  # (importing fastint loads the extension)

pytestmark = pytest.mark.cpu_kernel

HALF = torch.float16
# Every float16 bit pattern, and the finite ones.
ALL = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(HALF)
FINITE = ALL[torch.isfinite(ALL)]

# (name, channels per half, H, W): sizes whose runs end in tails shorter than a vector.
SHAPES = [
    ("contiguous", 4, 93, 181),      # one long run (merged dims), odd length
    ("sliced", 3, 100, 229),         # unit-stride runs of 229 = 14 * 16 + 5, rows apart
    ("sliced_short", 3, 1000, 23),   # runs of 23 = 16 + 7 (AVX-512), 2 * 8 + 7 (AVX2)
    ("sliced_tiny", 2, 1600, 11),    # runs shorter than the kernel's long-run threshold (16)
    ("channels_last", 4, 91, 93),    # pixel-interleaved runs (C < 16)
    ("channels_last_wide", 21, 41, 39),  # direct runs of C = 21 channels
    ("transposed", 3, 97, 113),      # strided innermost dim: tile passes
]


def layout_as(values, name):
    """The logical tensor `values` stored with the layout of SHAPES' `name` (values unchanged)."""
    if name.startswith("sliced"):
        wide = torch.zeros(values.shape[:-1] + (values.shape[-1] + 3,), dtype=values.dtype)
        wide[..., : values.shape[-1]] = values
        out = wide[..., : values.shape[-1]]
    elif name.startswith("channels_last"):
        out = values.contiguous(memory_format=torch.channels_last)
    elif name == "transposed":
        out = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        out = values.contiguous()
    assert torch.equal(out.view(torch.int16), values.view(torch.int16))
    return out


def patterns(shape, gen):
    """A float16 tensor of `shape` that holds every bit pattern (a shuffled, repeated ALL)."""
    n = 1
    for s in shape:
        n *= s
    assert n >= ALL.numel()
    reps = -(-n // ALL.numel())
    idx = torch.cat([torch.randperm(ALL.numel(), generator=gen) for _ in range(reps)])[:n]
    return ALL[idx].reshape(shape)


def assert_bits_equal(out, ref):
    """out == ref bit for bit, except that a NaN need only be a NaN."""
    assert out.dtype == ref.dtype == HALF and out.shape == ref.shape
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), f"{int((nan_out != nan_ref).sum())} NaN positions differ"
    a = out.contiguous().view(torch.int16)[~nan_ref]
    b = ref.contiguous().view(torch.int16)[~nan_ref]
    bad = (a != b).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{bad.numel()} of {a.numel()} outputs differ, e.g. {float(a[i:i + 1].view(HALF))} "
            f"(bits {int(a[i]) & 0xffff:#06x}) vs torch's cast {float(b[i:i + 1].view(HALF))} "
            f"(bits {int(b[i]) & 0xffff:#06x})")


def check_step(z, eps, coef, step, dim, noise=None):
    out = torch.ops.fastint.step(z, list(eps), coef, step, dim, noise, None, 0)
    assert out.stride() == torch.empty_like(z).stride()
    # float32 terms in the kernel's order, then torch's float32 -> float16 cast
    ref = step_reference(z, eps, coef, step, dim, noise, compute_dtype=torch.float32)
    assert_bits_equal(out, ref)


def coef_rows(k, gen):
    """Rows: the identity (out = z: every input pattern through both conversions), normal draws, and
    scaled ones (outputs from float32 subnormals to far past 65504)."""
    width = 7 + 4 * k
    ident = torch.zeros(1, width)
    ident[0, 0] = ident[0, 3] = 1.0
    rnd = torch.randn(3, width, generator=gen)
    scale = torch.tensor([2.0**-20, 1e-3, 1.0, 3.0e3]).reshape(4, 1)
    return torch.cat([ident, rnd, rnd[:1] * scale])


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dim", [1, 2])
def test_every_pattern_matches_torch_cast(shape, k, dim):
    name, c, h, w = shape
    gen = torch.Generator().manual_seed(1000 * k + 10 * dim + len(name))
    full = (2, dim * c, h, w)
    z = layout_as(patterns(full, gen), name)
    # the identity row adds Q * eps: zeros there (0 * inf would be NaN); patterns in the others
    zeros = [layout_as(torch.zeros(full, dtype=HALF), name) for _ in range(k)]
    eps = [layout_as(patterns(full, gen), name) for _ in range(k)]
    coef = coef_rows(k, gen)
    check_step(z, zeros, coef, 0, dim)
    for step in range(1, coef.shape[0]):
        check_step(z, eps, coef, step, dim)


def ulp_half(h):
    """float16 spacing at |h| (finite h), as float16: 2^(max(e, -14) - 10) with 2^e <= |h| < 2^(e+1)."""
    _, e = torch.frexp(h.float().abs().clamp(min=2.0**-14))
    return torch.ldexp(torch.ones_like(h, dtype=torch.float32), e - 11).to(HALF)


# h + q * ulp(h) is exact in float32 (12 bits below h's last one at most): q = +-1/2 makes a tie
# (to even: down from an even mantissa, up from an odd one; 65504 + 16 is inf), the others fall
# just short of or just past it (65504 + 15.98 stays 65504); subnormal h gives subnormal ties.
TIE_Q = [0.5, -0.5, 0.5 - 2.0**-11, 0.5 + 2.0**-11, -(0.5 - 2.0**-11), -(0.5 + 2.0**-11), 0.25, 0.75]


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dim", [1, 2])
def test_ties_and_overflow_match_torch_cast(shape, dim):
    name, c, h, w = shape
    gen = torch.Generator().manual_seed(7 + dim)
    full = (2, dim * c, h, w)
    n = 2 * dim * c * h * w
    reps = -(-n // FINITE.numel())
    idx = torch.cat([torch.randperm(FINITE.numel(), generator=gen) for _ in range(reps)])[:n]
    zl = FINITE[idx].reshape(full)
    # z = h (both halves), eps = ulp(h) (both halves): x' = x + q ulp(x), m' = m + q ulp(m)
    z = layout_as(zl, name)
    eps = [layout_as(ulp_half(zl), name)]
    coef = torch.zeros(len(TIE_Q), 11)
    coef[:, 0] = coef[:, 3] = 1.0
    coef[:, 7] = coef[:, 10] = torch.tensor(TIE_Q)
    for step in range(len(TIE_Q)):
        check_step(z, eps, coef, step, dim)
    # the inputs really make these cases (q = 1/2): ties rounded up and down, subnormal ties, inf
    zf = zl.float()
    x = zf + 0.5 * ulp_half(zl).float()
    up, kept = x.to(HALF).float() > zf, x.to(HALF).float() == zf
    assert bool(up.any()) and bool(kept.any()) and bool(torch.isinf(x.to(HALF)).any())
    assert bool(((zf.abs() < 2.0**-14) & (zf != 0) & kept).any())


@pytest.mark.parametrize("dim", [1, 2])
def test_tile_passes_match_torch_cast(dim):
    """K = 4 and a float32 noise tensor take the tile passes (not the direct runs)."""
    gen = torch.Generator().manual_seed(11)
    full = (2, dim * 5, 77, 91)
    z = patterns(full, gen)
    eps = [patterns(full, gen) for _ in range(4)]
    coef = coef_rows(4, gen)
    for step in range(1, coef.shape[0]):
        check_step(z, eps, coef, step, dim)
        check_step(z, eps[:2], coef[:, : 7 + 8].contiguous(), step, dim, noise=torch.randn(full, generator=gen))
        cl = [t.contiguous(memory_format=torch.channels_last) for t in [z] + eps[:1]]
        check_step(cl[0], cl[1:], coef[:, : 7 + 4].contiguous(), step, dim, noise=torch.randn(full, generator=gen))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_builds(capability):
    """The same checks on the baseline and AVX2 builds (this process runs the best one the CPU has)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
           "not test_other_builds"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
