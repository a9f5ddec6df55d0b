"""Triton kernel of the fused step op (the CUDA implementation of torch.ops.fastint.step).

One program handles BLOCK pixels of the x part [B, C, *S] (logical row-major index i).
Each pixel reads x, m (= x + C * channel stride), the eps history and the noise and
writes x', m': one pass over memory, fp32 arithmetic, any storage dtype and strides.

Layouts: the launcher merges adjacent logical dims that are contiguous with respect to
each other in every operand (z, out, each eps, noise) and drops size-1 dims, keeping the
logical order, so i stays the row-major index that seeds Philox. Up to 4 dims remain
(contiguous, channels_last, channel halves and most views need 1 to 3); beyond 4 the
launcher falls back to contiguous copies. The coefficient row coef[step] is read by the
kernel (no host sync), and so is the Philox key when given as seed_tensor, so a sampling
loop can be captured in a CUDA graph and replayed with fresh noise.

Runs on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported).
"""
import contextlib

import torch
import triton
import triton.language as tl

from .step_reference import STORAGE_DTYPES, check_step_args

MAX_RANK = 4
INT32_INDEX_LIMIT = 2**31  # from this many pixels on, index arithmetic is 64-bit


@triton.jit
def _offsets(i0, i1, i2, i3, st):
    """Element offset of logical index (i0, i1, i2, i3) for the strides st, in int64."""
    return i0.to(tl.int64) * st[0] + i1.to(tl.int64) * st[1] + i2.to(tl.int64) * st[2] + i3.to(tl.int64) * st[3]


@triton.jit
def _uniform(r):
    """Triton's uint_to_uniform_float: uint32 word -> float32 in [0, 1)."""
    v = r.to(tl.int32, bitcast=True)
    v = tl.where(v < 0, ~v, v)
    return v.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _store(ptr, v, mask):
    """Store fp32 v into ptr's dtype, rounding to nearest even (done by hand for bf16
    because the interpreter's fp32 -> bf16 cast truncates)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        h = tl.where(v == v, b >> 16, 0x7FC0).to(tl.uint16)
        tl.store(ptr, h.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["step", "seed", "offset"])
def _step_kernel(
    out_ptr, z_ptr, eps_ptrs, noise_ptr, coef_ptr,
    out_st, z_st, eps_st, noise_st,  # strides of the collapsed x part (4 each; eps_st: one per term)
    out_m, z_m, eps_m, noise_m,  # element offset of the m half: C * channel stride
    n, size1, size2, size3, row_stride, step, seed, offset, seed_ptr,
    DIM: tl.constexpr, K: tl.constexpr, NOISE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
    SEED_T: tl.constexpr = False,
):
    # NOISE: 0 none, 1 from the noise tensor, 2 Philox at counter offset + i, keyed by seed,
    # or with SEED_T by the int64 at seed_ptr (read here, so CUDA graphs see its current value)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    r = i if WIDE else i.to(tl.int32)  # 32-bit div/mod (much cheaper) when n < 2**31
    i3 = r % size3
    r = r // size3
    i2 = r % size2
    r = r // size2
    i1 = r % size1
    i0 = r // size1
    row = coef_ptr + step * row_stride

    zo = _offsets(i0, i1, i2, i3, z_st)
    x = tl.load(z_ptr + zo, mask=mask).to(tl.float32)
    acc_x = tl.load(row + 0) * x
    if DIM == 2:
        m = tl.load(z_ptr + zo + z_m, mask=mask).to(tl.float32)
        acc_x += tl.load(row + 1) * m
        acc_m = tl.load(row + 2) * x + tl.load(row + 3) * m
    else:
        acc_m = acc_x

    for j in tl.static_range(K):
        eo = _offsets(i0, i1, i2, i3, eps_st[j])
        ex = tl.load(eps_ptrs[j] + eo, mask=mask).to(tl.float32)
        acc_x += tl.load(row + 7 + 4 * j) * ex
        if DIM == 2:
            em = tl.load(eps_ptrs[j] + eo + eps_m[j], mask=mask).to(tl.float32)
            acc_x += tl.load(row + 8 + 4 * j) * em
            acc_m += tl.load(row + 9 + 4 * j) * ex
            acc_m += tl.load(row + 10 + 4 * j) * em

    if NOISE != 0:
        if NOISE == 1:
            no = _offsets(i0, i1, i2, i3, noise_st)
            xi_x = tl.load(noise_ptr + no, mask=mask).to(tl.float32)
            if DIM == 2:
                xi_m = tl.load(noise_ptr + no + noise_m, mask=mask).to(tl.float32)
            else:
                xi_m = xi_x
        else:
            if SEED_T:
                key = tl.load(seed_ptr)
            else:
                key = seed
            # The stream of csrc/philox.h: pair p from the words (r0, r1) of counter p >> 1 if p
            # is even, (r2, r3) if odd; dim 2 takes pair c, dim 1 the cos (even c) or sin (odd c)
            # half of pair c >> 1. Shifts are logical (c is read as uint64).
            c = offset + i
            p = c if DIM == 2 else (c >> 1) & 0x7FFFFFFFFFFFFFFF
            r0, r1, r2, r3 = tl.randint4x(key, (p >> 1) & 0x7FFFFFFFFFFFFFFF)
            odd = (p & 1) == 1
            u1 = tl.maximum(1.0e-7, _uniform(tl.where(odd, r2, r0)))
            rad = tl.sqrt(-2.0 * tl.log(u1))
            th = 6.283185307179586 * _uniform(tl.where(odd, r3, r1))
            xi_x = rad * tl.cos(th)
            xi_m = rad * tl.sin(th)
            if DIM == 1:
                xi_x = tl.where((c & 1) == 1, xi_m, xi_x)
        acc_x += tl.load(row + 4) * xi_x
        if DIM == 2:
            acc_m += tl.load(row + 5) * xi_x
            acc_m += tl.load(row + 6) * xi_m

    oo = _offsets(i0, i1, i2, i3, out_st)
    _store(out_ptr + oo, acc_x, mask)
    if DIM == 2:
        _store(out_ptr + oo + out_m, acc_m, mask)


def collapse_dims(shape, strides):
    """Merge adjacent dims of ``shape`` that are contiguous w.r.t. each other in every
    stride list of ``strides``; drop size-1 dims. Logical order is kept.

    Returns (sizes, per-operand strides), outermost first, at least one dim.
    """
    dims = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        sts = [st[d] for st in strides]
        if dims and all(outer == inner * size for outer, inner in zip(dims[-1][1], sts)):
            dims[-1] = (dims[-1][0] * size, sts)
        else:
            dims.append((size, sts))
    if not dims:
        dims = [(1, [0] * len(strides))]
    sizes = [s for s, _ in dims]
    return sizes, [[sts[k] for _, sts in dims] for k in range(len(strides))]


def step_triton(z, eps, coef, step, dim, noise=None, seed=None, offset=0, seed_tensor=None, *, block=1024, out=None):
    """fastint::step with the Triton kernel (CUDA tensors, or CPU tensors when interpreted).

    Returns a new tensor torch.empty_like(z) (channels_last is kept), or writes into ``out``
    (checked by the caller: fastint.ops.check_out) and returns it.
    """
    k = check_step_args(z, eps, coef, step, dim, noise, seed, offset, seed_tensor)
    if z.dtype not in STORAGE_DTYPES:  # float64 goes through fastint.ops.step's float64 path
        raise TypeError(f"z must have dtype float32, float16 or bfloat16 for the Triton kernel, got {z.dtype} "
                        "(fastint.ops.step takes float64)")
    eps = list(eps)
    out = torch.empty_like(z) if out is None else out
    if z.numel() == 0:
        return out
    mode = 1 if noise is not None else (2 if seed is not None or seed_tensor is not None else 0)
    keyed = mode == 2 and seed_tensor is not None
    c = z.shape[1] // dim
    x_shape = (z.shape[0], c) + tuple(z.shape[2:])
    ops = [out, z] + eps + ([noise] if mode == 1 else [])
    sizes, strides = collapse_dims(x_shape, [t.stride() for t in ops])
    if len(sizes) > MAX_RANK:
        # Rare (needs > 4 mutually non-mergeable dims): run on contiguous copies.
        res = step_triton(z.contiguous(), [e.contiguous() for e in eps], coef, step, dim,
                          noise.contiguous() if mode == 1 else None, seed, offset, seed_tensor, block=block)
        return out.copy_(res)
    pad = MAX_RANK - len(sizes)
    sizes = [1] * pad + sizes
    strides = [tuple([0] * pad + st) for st in strides]
    m_off = [c * t.stride(1) for t in ops]
    n = out.numel() // dim
    grid = (triton.cdiv(n, block),)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _step_kernel[grid](
            out, z, tuple(eps), noise if mode == 1 else None, coef,
            strides[0], strides[1], tuple(strides[2:2 + k]), strides[2 + k] if mode == 1 else None,
            m_off[0], m_off[1], tuple(m_off[2:2 + k]), m_off[2 + k] if mode == 1 else 0,
            n, sizes[1], sizes[2], sizes[3], coef.stride(0), step,
            seed if mode == 2 and not keyed else 0, offset, seed_tensor if keyed else None,
            DIM=dim, K=k, NOISE=mode, WIDE=n >= INT32_INDEX_LIMIT, BLOCK=block, SEED_T=keyed,
            num_warps=4, enable_fp_fusion=False,
        )
    return out

