"""The CPU kernel's in-kernel noise is the reference stream (fastint.ops.step_reference):
pair p = Box-Muller on the words (r0, r1) of Philox counter p >> 1 for even p, (r2, r3) for odd
p; a dim-2 element with counter c takes pair c, a dim-1 element the cos (even c) or sin (odd c)
half of pair c >> 1. Checked on every layout path of the kernel (long runs, short strided runs,
pixel-interleaved tiles), on odd offsets, across 2**32 and across the uint64 wrap."""
import math

import pytest
import torch

import fastint  # noqa: F401  (loads the extension)
from fastint.ops import philox_normals, step_reference
from fastint.ops import step as step_op
from fastint.ops.step_reference import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, philox_pairs

OFFSETS = [0, 1, 6, 2**32 - 41, 2**62 - 3, 2**63 - 5, -3, -(2**32) - 7, -70]


def _noise(z, dim, seed, offset):
    """The op's noise for a state laid out like z: P = Q = 0 and S = I."""
    coef = torch.zeros(1, 11)
    coef[0, 4] = coef[0, 6] = 1.0
    zeros = torch.zeros_like(z)
    return step_op(zeros, [zeros], coef, 0, dim, seed=seed, offset=offset)


def _layout(z, layout):
    """z's values in another memory layout."""
    if layout == "channels_last":
        return z.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return z.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every second column of a wider tensor
        wide = torch.zeros(*z.shape[:-1], 2 * z.shape[-1], dtype=z.dtype)
        return wide[..., ::2].copy_(z)
    return z


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 40, 37), (3, 20, 4, 5)])
def test_cpu_noise_is_the_reference_stream(dim, layout, shape):
    shape = (shape[0], dim * shape[1]) + shape[2:]
    z = _layout(torch.zeros(shape), layout)
    for offset in OFFSETS:
        got = _noise(z, dim, 1234567, offset)
        want = philox_normals(1234567, offset, shape, dim)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6, msg=f"offset {offset}")


@pytest.mark.parametrize("dim", [1, 2])
def test_cpu_noise_long_runs_and_the_wrap(dim):
    """Runs longer than a vector block and a tile, starting just before the uint64 wrap (the
    dim-1 pair index jumps from 2**63 - 1 back to 0 there, the dim-2 counter from 2**63 - 1)."""
    shape = (1, dim, 5000)
    for offset in (-2501, -2500, -17, 2**63 - 2500):
        got = _noise(torch.zeros(shape), dim, 99, offset)
        torch.testing.assert_close(got, philox_normals(99, offset, shape, dim), rtol=0, atol=2e-6)


def _philox_scalar(counter, seed):
    """Philox4x32-10 on Python ints, written out from its definition."""
    c = [counter & 0xFFFFFFFF, counter >> 32, 0, 0]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        pa, pb = PHILOX_ROUND_A * c[0], PHILOX_ROUND_B * c[2]
        c = [((pb >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, pb & 0xFFFFFFFF, ((pa >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF,
             pa & 0xFFFFFFFF]
        k0, k1 = (k0 + PHILOX_KEY_A) & 0xFFFFFFFF, (k1 + PHILOX_KEY_B) & 0xFFFFFFFF
    return c


def _uniform(w):
    x = w - 2**32 if w >= 2**31 else w
    x = ~x if x < 0 else x
    return float(torch.tensor(float(x), dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32))


@pytest.mark.parametrize("pair", [0, 1, 2, 3, 2**32 + 1, 2**63 + 4, 2**64 - 1])
def test_pairs_use_two_words_each_of_one_philox_call(pair):
    seed = 2**40 + 3
    w = _philox_scalar(pair >> 1, seed)
    a, b = (w[2], w[3]) if pair & 1 else (w[0], w[1])
    u1, u2 = max(_uniform(a), float(torch.tensor(1e-7, dtype=torch.float32))), _uniform(b)
    rad, th = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2
    cos, sin = philox_pairs(seed, torch.tensor([pair - 2**64 if pair >= 2**63 else pair]))
    assert float(cos) == pytest.approx(rad * math.cos(th), abs=1e-12)
    assert float(sin) == pytest.approx(rad * math.sin(th), abs=1e-12)


def test_dim1_normals_are_the_pair_halves_in_turn():
    pairs_cos, pairs_sin = philox_pairs(5, torch.arange(10, 30))
    normals = philox_normals(5, 20, (1, 1, 40), 1).flatten().double()
    torch.testing.assert_close(normals[0::2], pairs_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(normals[1::2], pairs_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 2])
def test_cpu_noise_statistics(dim):
    """Mean, variance, kurtosis, neighbour correlation and the neighbours' squares (a shared
    Box-Muller radius would correlate them) within 5 standard errors."""
    xi = _noise(torch.zeros(2, dim * 2, 128, 128), dim, 2024, 3).double()
    v = xi.flatten()
    n = v.numel()
    assert abs(float(v.mean())) < 5 / math.sqrt(n)
    assert abs(float(v.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((v**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # the two halves of each pair: x and m channels (dim 2), neighbours (dim 1)
    a, b = (xi[:, :2].flatten(), xi[:, 2:].flatten()) if dim == 2 else (v[0::2], v[1::2])
    for x, y in ((a, b), (v[1:], v[:-1])):
        assert abs(float((x * y).mean())) < 5 / math.sqrt(x.numel())
        # squares of independent normals: E[x^2 y^2] = 1, sd sqrt(E[x^4] E[y^4] - 1) = sqrt(8)
        assert abs(float((x**2 * y**2).mean()) - 1) < 5 * math.sqrt(8 / x.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_philox_step_is_bit_identical_across_kernel_paths(dtype, dim, K):
    """Contiguous runs add the normals inside the buffer-free runs; a transposed layout makes
    them with a counter stride; a sliced layout (no unit stride) goes through the tile passes.
    The same float32 terms in the same order: the same bits."""
    g = torch.Generator().manual_seed(K + 3 * dim)
    shape = (2, dim * 6, 33, 40)
    z = torch.randn(shape, generator=g).to(dtype)
    eps = [torch.randn(shape, generator=g).to(dtype) for _ in range(K)]
    coef = torch.randn(3, 7 + 4 * K, generator=g)
    want = step_op(z, eps, coef, 1, dim, seed=9, offset=-77)
    for layout in ("transposed", "sliced"):
        lz, le = _layout(z, layout), [_layout(e, layout) for e in eps]
        assert not lz.is_contiguous() and lz.dtype == dtype
        got = step_op(lz, le, coef, 1, dim, seed=9, offset=-77)
        assert torch.equal(got, want), layout
    torch.testing.assert_close(want.float(), step_reference(z, eps, coef, 1, dim, seed=9, offset=-77).float(),
                               rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)
