"""fastint.ops: the fused step op torch.ops.fastint.step and its out= form torch.ops.fastint.step_out
(docs/design.md, "The op").

One affine update per pixel, z' = P z + sum_j Q_j eps_j + S xi, with the coefficients
read on the device from a float32 table row. Implementations behind one op:

- CPU: C++ kernel (csrc/step_cpu.cpp), registered by the extension;
- CUDA: Triton kernel (step_triton.py), registered here;
- Meta / fake tensors: shape-only kernel registered here, so torch.compile(fullgraph=True)
  traces the op;
- step_reference: plain PyTorch, for tests only.

Importing this module needs no GPU.
"""
import torch

from .. import _ext
from .step_reference import check_out, check_step_args, philox_normals, step_reference

_ext.load()  # defines torch.ops.fastint.* (no-op when already loaded)

try:
    from .step_triton import step_triton
except ImportError as _e:  # triton is a dependency; keep CPU use working without it
    _triton_error = _e

    def step_triton(*args, **kwargs):
        raise RuntimeError(f"fastint::step on CUDA needs triton, which failed to import: {_triton_error}")

def _step_out_triton(z, eps, coef, step, dim, out, noise=None, seed=None, offset=0, seed_tensor=None):
    check_out(z, eps, out, noise)
    step_triton(z, eps, coef, step, dim, noise, seed, offset, seed_tensor, out=out)


_lib = torch.library.Library("fastint", "IMPL")
_lib.impl("step", step_triton, "CUDA")
_lib.impl("step_out", _step_out_triton, "CUDA")


@torch.library.register_fake("fastint::step")
def _step_fake(z, eps, coef, step, dim, noise=None, seed=None, offset=0, seed_tensor=None):
    check_step_args(z, eps, coef, step, dim, noise, seed, offset, seed_tensor)
    return torch.empty_like(z)


@torch.library.register_fake("fastint::step_out")
def _step_out_fake(z, eps, coef, step, dim, out, noise=None, seed=None, offset=0, seed_tensor=None):
    check_step_args(z, eps, coef, step, dim, noise, seed, offset, seed_tensor)
    check_out(z, eps, out, noise, data=False)


def step(z, eps, coef, step, dim, noise=None, seed=None, offset=0, seed_tensor=None, out=None):
    """One fused integrator step: returns a new tensor like z (same dtype and layout), or, with
    ``out`` (z's shape and dtype, any strides), writes into ``out`` and returns it. ``out``
    must not share memory with z, eps or noise (ValueError).

    z: state [B, dim*C, *S] (float32/16, bfloat16, or float64: see below; any strides), x = first C channels,
    m = last C for dim 2. eps: list [eps_n, eps_{n-1}, ...] like z. coef: float32 table
    [R, W >= 7 + 4*len(eps)] on z's device; row ``step`` = [P(4), S(3), Q_0(4), Q_1(4), ...]
    (2x2 matrices row-major, S lower triangular). Noise: the tensor ``noise`` (like z) if
    given, else in-kernel Philox normals at counters offset + i (the stream of docs/design.md),
    keyed by ``seed_tensor`` (int64 [1] on z's device, read by the kernel: a CUDA graph replays
    with whatever key it holds) or by the int ``seed`` (baked into a trace or graph), else none.
    Arguments are checked here (TypeError / ValueError) before dispatch.

    float64 (reference and testing work): the same update in float64 arithmetic by ATen ops (a
    few passes, not fused), with ``coef`` in float64 (full precision) or float32; the Philox
    normals are the kernels' own (float32, the same words), so noise matches the other dtypes.
    """
    check_step_args(z, eps, coef, step, dim, noise, seed, offset, seed_tensor)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (z, *eps, noise, coef)):
        return _step_autograd(z, list(eps), coef, step, dim, noise, seed, offset, seed_tensor, out)
    if z.dtype == torch.float64:
        res = _step_float64(z, list(eps), coef, step, dim, noise, seed, offset, seed_tensor)
        if out is None:
            return res
        check_out(z, eps, out, noise, data=not torch.compiler.is_compiling())
        return out.copy_(res)
    if out is None:
        return torch.ops.fastint.step(z, list(eps), coef, step, dim, noise, seed, offset, seed_tensor)
    check_out(z, eps, out, noise, data=not torch.compiler.is_compiling())
    torch.ops.fastint.step_out(z, list(eps), coef, step, dim, out, noise, seed, offset, seed_tensor)
    return out


def _step_autograd(z, eps, coef, step, dim, noise, seed, offset, seed_tensor, out):
    """The step when an input requires grad: the fused kernels have no derivative, so the same
    update runs as step_reference's ATen ops (float32 arithmetic, float64 for float64 states;
    the Philox normals are the kernels' own), which autograd differentiates: the step is linear in
    z, ε and the noise. ``out`` cannot hold a result that requires grad."""
    if out is not None:
        raise ValueError("out= cannot take the result of a step whose inputs require grad: call it "
                         "without out, or under torch.no_grad()")
    if noise is None and (seed is not None or seed_tensor is not None):
        noise = philox_noise(z.detach(), dim, seed, offset, seed_tensor)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    res = step_reference(z, eps, coef, step, dim, noise=noise, compute_dtype=work)
    return torch.empty_like(z).copy_(res)  # z's layout, as the fused op (copy_ carries the gradient)


def _step_float64(z, eps, coef, step, dim, noise, seed, offset, seed_tensor):
    """The float64 path: step_reference's arithmetic in float64 (no host read: the Philox key is
    read on the device by the fused kernel that makes the normals)."""
    if noise is None and (seed is not None or seed_tensor is not None):
        noise = philox_noise(z, dim, seed, offset, seed_tensor)
    out = step_reference(z, eps, coef, step, dim, noise=noise, compute_dtype=torch.float64)
    return torch.empty_like(z).copy_(out)


_UNIT_S = {}


def philox_noise(z, dim, seed=None, offset=0, seed_tensor=None):
    """The op's in-kernel Philox normals for a state like ``z`` (float32, contiguous): one fused
    step on zeros with P = Q = 0 and S = I, so exactly the noise every dtype's step adds."""
    key = (str(z.device), dim)
    if key not in _UNIT_S:
        row = torch.zeros(1, 11)
        row[0, 4] = row[0, 6] = 1.0  # S00 = S11 = 1, S10 = 0
        _UNIT_S[key] = row.to(z.device)
    zeros = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    return torch.ops.fastint.step(zeros, [zeros], _UNIT_S[key], 0, dim, None, seed, offset, seed_tensor)


__all__ = ["step", "step_reference", "step_triton", "philox_normals", "philox_noise", "check_step_args", "check_out"]
