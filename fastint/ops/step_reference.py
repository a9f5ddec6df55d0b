"""Plain-PyTorch reference of the fused step op and of its Philox noise (used by tests).

The op contract (docs/design.md, "The op"): per pixel, with x, m the channel halves of z (dim 2) or x = z
(dim 1) and row = coef[step],

    x' = P00 x + P01 m + sum_j (Qj_00 ex_j + Qj_01 em_j) + S00 xi_x
    m' = P10 x + P11 m + sum_j (Qj_10 ex_j + Qj_11 em_j) + S10 xi_x + S11 xi_m

row = [P00, P01, P10, P11, S00, S10, S11, Q0_00, Q0_01, Q0_10, Q0_11, Q1_00, ...].
The noise xi comes from a tensor, or from the Philox normal stream at counter offset + i (i
the row-major index of the element in the x part): Philox4x32-10 words exactly as Triton's
``tl.randint4x``, each call's four words making two Box–Muller pairs (``philox_pairs``), so
that it depends neither on memory layout nor on backend.

Nothing here is fast: the Philox rounds run as int64 tensor arithmetic so every uint32
word is exact, and the Box–Muller transform runs in float64 before rounding to float32.
"""
import math

import torch

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 states take the op's float64 path (fastint.ops.step: ATen arithmetic in float64, with
# a float64 or float32 table); the fused kernels themselves are float32-arithmetic.
STATE_DTYPES = STORAGE_DTYPES + (torch.float64,)

# Philox4x32-10 constants (Salmon et al. 2011; the ones in triton/language/random.py).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words, and the Box–Muller floor on u1.
UNIFORM_SCALE = 4.6566127342e-10
U1_MIN = 1.0e-7

_M32 = 0xFFFFFFFF
_M63 = 2**63 - 1  # after an arithmetic >> 1 of an int64: the logical shift of its uint64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_like_z(t, z, name):
    """TypeError / ValueError unless ``t`` is a tensor with z's dtype, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != z.dtype:
        raise TypeError(f"{name} must have z's dtype {z.dtype}, got {t.dtype}")
    if t.shape != z.shape:
        raise ValueError(f"{name} must have z's shape {tuple(z.shape)}, got {tuple(t.shape)}")
    if t.device != z.device:
        raise ValueError(f"{name} must be on z's device {z.device}, got {t.device}")


def check_step_args(z, eps, coef, step, dim, noise=None, seed=None, offset=0, seed_tensor=None):
    """Validate the arguments of fastint::step; raise TypeError/ValueError naming the argument.

    Only metadata is inspected (no data, no host sync), so this also runs on fake tensors.
    Returns the number of history terms K = len(eps).
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in STATE_DTYPES:
        raise TypeError(f"z must have dtype float32, float16, bfloat16 or float64, got {z.dtype}")
    if not isinstance(dim, (int, torch.SymInt)) or isinstance(dim, bool) or dim not in (1, 2):
        raise ValueError(f"dim must be 1 (x only, VP) or 2 (x and m halves), got {dim!r}")
    if z.dim() < 2:
        raise ValueError(f"z must have shape [B, dim*C, ...] with at least 2 dims, got shape {tuple(z.shape)}")
    if z.shape[1] % dim != 0:
        raise ValueError(
            f"z must have an even channel count for dim=2 (x and m halves), got {z.shape[1]} channels"
        )
    if not isinstance(eps, (list, tuple)) or len(eps) == 0:
        raise ValueError("eps must be a non-empty list of tensors [eps_n, eps_{n-1}, ...]")
    for j, e in enumerate(eps):
        _check_like_z(e, z, f"eps[{j}]")
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dtype != torch.float32 and not (coef.dtype == torch.float64 and z.dtype == torch.float64):
        raise TypeError(f"coef must be a float32 table (or float64 with a float64 z), got {coef.dtype}")
    if coef.dim() != 2:
        raise ValueError(f"coef must be a 2-D table [R, W], got shape {tuple(coef.shape)}")
    if coef.device != z.device:
        raise ValueError(f"coef must be on z's device {z.device}, got {coef.device}")
    if not coef.is_contiguous():
        raise ValueError("coef must be contiguous")
    need = 7 + 4 * len(eps)
    if coef.shape[1] < need:
        raise ValueError(f"coef must have at least 7 + 4*len(eps) = {need} columns, got {coef.shape[1]}")
    if not isinstance(step, (int, torch.SymInt)) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= step < coef.shape[0]:
        raise ValueError(f"step must be in [0, {coef.shape[0]}) (rows of coef), got {step}")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if not noise.dtype.is_floating_point:
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if noise.shape != z.shape:
            raise ValueError(f"noise must have z's shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        if noise.device != z.device:
            raise ValueError(f"noise must be on z's device {z.device}, got {noise.device}")
    if seed is not None:
        if not isinstance(seed, (int, torch.SymInt)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed <= _INT64_MAX:
            raise ValueError(f"seed must be a non-negative int64, got {seed}")
    if seed_tensor is not None:
        if not isinstance(seed_tensor, torch.Tensor):
            raise TypeError(f"seed_tensor must be a torch.Tensor or None, got {type(seed_tensor).__name__}")
        if seed_tensor.dtype != torch.int64:
            raise TypeError(f"seed_tensor must be int64, got {seed_tensor.dtype}")
        if seed_tensor.numel() != 1:
            raise ValueError(f"seed_tensor must hold one element, got shape {tuple(seed_tensor.shape)}")
        if seed_tensor.device != z.device:
            raise ValueError(f"seed_tensor must be on z's device {z.device}, got {seed_tensor.device}")
    if not isinstance(offset, (int, torch.SymInt)) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not _INT64_MIN <= offset <= _INT64_MAX:
        raise ValueError(f"offset must fit in int64, got {offset}")
    return len(eps)


def _byte_range(t):
    """[first, last + 1) bytes that t's elements span."""
    lo = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
    hi = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
    p = t.data_ptr()
    return p + lo * t.element_size(), p + (hi + 1) * t.element_size()


def check_out(z, eps, out, noise=None, data=True):
    """Validate the ``out`` of fastint::step_out (TypeError / ValueError): z's shape, dtype and
    device, no requires_grad under grad mode, and with ``data`` (real tensors, not fake ones) no
    memory shared with an input (not even out is z: the CPU kernel reads through restrict pointers)."""
    _check_like_z(out, z, "out")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out requires grad, but the fused step has no derivative: call it under torch.no_grad()")
    if not data or out.numel() == 0:
        return
    if any(n > 1 and st == 0 for n, st in zip(out.shape, out.stride())):
        raise ValueError("out has overlapping elements (e.g. an expanded tensor)")
    named = [("z", z)] + [(f"eps[{j}]", e) for j, e in enumerate(eps)] + ([("noise", noise)] if noise is not None else [])
    ro = _byte_range(out)
    for name, t in named:
        if t.numel() == 0:
            continue
        rt = _byte_range(t)
        if ro[0] < rt[1] and rt[0] < ro[1]:
            raise ValueError(f"out must not overlap {name} (write into a separate buffer)")


def _mul_hi_lo(a, b):
    """(hi32, lo32) of the 64-bit product of the uint32 constant a and uint32 words b (int64).

    b is split into 16-bit halves so that no intermediate leaves int64.
    """
    lo = a * (b & 0xFFFF)  # < 2**48
    mid = a * (b >> 16)  # < 2**48
    hi = (mid + (lo >> 16)) >> 16
    low = (((mid & 0xFFFF) << 16) + lo) & _M32
    return hi, low


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=PHILOX_ROUNDS):
    """Philox4x32 on uint32 words held in int64 tensors (counter c0..c3, key k0, k1 ints).

    Same round function and key schedule as Random123's philox4x32 and Triton's philox_impl.
    """
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_words(seed, counters):
    """The 4 uint32 words (int64 tensors) of ``tl.randint4x(seed, counters)``.

    counters: int64 tensor read as uint64 (two's complement), split into (lo32, hi32, 0, 0);
    the key is (lo32(seed), hi32(seed)).
    """
    c = counters.to(torch.int64)
    lo, hi = c & _M32, (c >> 32) & _M32
    zero = torch.zeros_like(c)
    return philox4x32(lo, hi, zero, zero, seed & _M32, (seed >> 32) & _M32)


def uniform_from_words(r):
    """Triton's uint_to_uniform_float for uint32 words: float32 in [0, 1)."""
    r = r & _M32
    v = torch.where(r >= 2**31, _M32 - r, r)  # bitcast to int32, then ~x for negative x
    return v.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=r.device)


def philox_pairs(seed, pairs):
    """The Box-Muller pairs (cos half, sin half; float64) of the stream's pair indices ``pairs``
    (int64 tensor read as uint64): pair p uses the words (r0, r1) of counter p >> 1 when p is
    even, (r2, r3) when it is odd, so one Philox call makes two pairs."""
    p = pairs.to(torch.int64)
    r0, r1, r2, r3 = philox_words(seed, (p >> 1) & _M63)
    odd = (p & 1) == 1
    u1 = torch.maximum(uniform_from_words(torch.where(odd, r2, r0)),
                       torch.tensor(U1_MIN, dtype=torch.float32, device=p.device))
    u2 = uniform_from_words(torch.where(odd, r3, r1))
    rad = torch.sqrt(-2.0 * torch.log(u1.double()))
    th = (2.0 * math.pi) * u2.double()
    return rad * torch.cos(th), rad * torch.sin(th)


def philox_normals(seed, offset, shape, dim, device=None):
    """The contract's in-kernel noise for a state of ``shape`` [B, dim*C, *S] (float32).

    Element i (row-major index in the x part [B, C, *S]) has counter c = offset + i (uint64).
    dim 2: xi_x and xi_m are the cos and sin halves of pair c. dim 1: xi is normal c of the
    stream, the cos half of pair c >> 1 for even c, the sin half for odd c.
    """
    shape = tuple(shape)
    c_total = shape[1]
    x_shape = (shape[0], c_total // dim) + shape[2:]
    n = math.prod(x_shape)
    counters = torch.arange(n, dtype=torch.int64, device=device) + offset  # wraps like uint64
    if dim == 1:
        cos, sin = philox_pairs(seed, (counters >> 1) & _M63)
        return torch.where((counters & 1) == 1, sin, cos).float().reshape(x_shape)
    cos, sin = philox_pairs(seed, counters)
    return torch.cat([cos.float().reshape(x_shape), sin.float().reshape(x_shape)], dim=1)


def step_reference(z, eps, coef, step, dim, noise=None, seed=None, offset=0, seed_tensor=None, *,
                   compute_dtype=torch.float32, out_dtype=None):
    """fastint::step in plain PyTorch: arithmetic in ``compute_dtype``, result in
    ``out_dtype`` (default z.dtype); the result is contiguous.

    Terms are added in the kernels' order (P z, then Q_j eps_j for j = 0.., then S xi).
    Tests use float64 for both as the exact value the kernels must approach.
    """
    k = check_step_args(z, eps, coef, step, dim, noise, seed, offset, seed_tensor)
    if seed_tensor is not None:  # the key the kernels read on the device (a host read here: tests only)
        seed = int(seed_tensor.reshape(()))
    if noise is None and seed is not None:
        noise = philox_normals(seed, offset, z.shape, dim, z.device)
    out_dtype = z.dtype if out_dtype is None else out_dtype
    c = z.shape[1] // dim
    row = coef[step].to(compute_dtype)

    def halves(t):
        t = t.to(compute_dtype)
        return (t[:, :c], t[:, c:]) if dim == 2 else (t, None)

    x, m = halves(z)
    if dim == 1:
        out = row[0] * x
        for j in range(k):
            out = out + row[7 + 4 * j] * halves(eps[j])[0]
        if noise is not None:
            out = out + row[4] * halves(noise)[0]
        return out.to(out_dtype)
    xn = row[0] * x + row[1] * m
    mn = row[2] * x + row[3] * m
    for j in range(k):
        ex, em = halves(eps[j])
        q = row[7 + 4 * j: 11 + 4 * j]
        xn = xn + q[0] * ex + q[1] * em
        mn = mn + q[2] * ex + q[3] * em
    if noise is not None:
        nx, nm = halves(noise)
        xn = xn + row[4] * nx
        mn = mn + row[5] * nx + row[6] * nm
    return torch.cat([xn, mn], dim=1).to(out_dtype)
