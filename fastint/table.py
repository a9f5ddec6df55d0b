"""Tables and the loop (docs/design.md, "Tables" and "The loop").

A ``Table`` is an integrator on an explicit sequence of times: row r belongs to the r-th map
of the sampling loop, made after a model call at ``times[r]`` (NaN: a row that makes no call),
and holds the per-pixel affine update  z' = P z + Σ_j Q_j ε_{r−j} + S ξ  as
``[P00 P01 P10 P11, S00 S10 S11, Q0_00 .. Q0_11, Q1_.., ...]`` (width 7 + 4K; VP uses the 00
entries only). The table is float64, built once by torch.ops.fastint.coefficients
(csrc/coefficients.cpp); ``Table.to(device)`` is its float32 copy on the sampling device.

Each row knows how many ε it really reads (``widths``: one past the highest non-zero Q), and
``DeviceTable.step`` passes the fused op exactly that many, so no step reads an ε that a zero
coefficient multiplies. ``run`` is the one sampling loop; ``fastint.Sampler``, the k-diffusion
functions and (step by step) the diffusers schedulers all go through these two objects.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _ext
from .grids import as_times
from .methods import METHODS, check_method, resolve
from .ops import step as fused_step

_ext.load()

__all__ = ["Table", "DeviceTable", "make_table", "run", "check_finite", "check_table", "MAX_COEF"]

_F64 = torch.float64
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


class Table:
    """A float64 integrator table on explicit times (see the module docstring).

    Attributes: ``coef`` [R, W] float64, ``times`` [R] float64 (NaN: no model call), ``dim``
    (1 for VP, 2 for phase space), ``method`` and ``options`` (the op's method and encoded
    options), ``info`` (fastint.methods.MethodInfo), ``calls`` (per row: does it call the
    model), ``widths`` (per row: ε it reads), ``history`` (the most any row reads).
    """

    def __init__(self, coef, times, dim, method, options=(), history_conv=None):
        self.coef, self.times, self.dim = coef, times, int(dim)
        # [R, 2] (a, b) when the history holds a·z + b·ε instead of ε (conj_ms predict='x0':
        # x̂0 = (z − σ ε)/α), else None
        self.history_conv = history_conv
        self.method, self.options = method, tuple(options)
        self.info = METHODS[method]
        self.calls = tuple(bool(c) for c in torch.isfinite(times))
        K = (coef.shape[1] - 7) // 4
        nz = (coef[:, 7:].reshape(coef.shape[0], K, 4) != 0).any(-1)  # [R, K]: Q_j non-zero
        idx = torch.arange(1, K + 1).expand_as(nz)
        self.widths = tuple(max(1, int(w)) for w in torch.where(nz, idx, 0).amax(1))
        self.history = max(self.widths) if self.widths else 1
        self._device = {}

    def __len__(self):
        return self.coef.shape[0]

    @property
    def P(self):
        """[R, 2, 2] views of the P blocks."""
        return self.coef[:, 0:4].reshape(-1, 2, 2)

    @property
    def S(self):
        """[R, 3]: S00, S10, S11 (S is lower triangular)."""
        return self.coef[:, 4:7]

    @property
    def Q(self):
        """[R, K, 2, 2] views of the Q blocks (Q_j multiplies ε_{r−j})."""
        return self.coef[:, 7:].reshape(len(self), -1, 2, 2)

    def to(self, device, dtype=torch.float32):
        """The ``DeviceTable`` on ``device``, made once per (device, dtype): float32 for the fused
        kernels, float64 (the table itself) for float64 states."""
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        key = (str(torch.device(device)), dtype)
        if key not in self._device:
            self._device[key] = DeviceTable(self, device, dtype)
        return self._device[key]

    def __repr__(self):
        return f"Table({self.method!r}, rows={len(self)}, dim={self.dim}, history={self.history})"


def table_dtype(state_dtype):
    """The coefficient dtype for states of ``state_dtype``: float64 for float64, else float32."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


class DeviceTable:
    """A Table's copy on one device (float32, or float64 for float64 states), and the step that
    applies one of its rows."""

    def __init__(self, table, device, dtype=torch.float32):
        self.table = table
        self.coef = table.coef.to(device=device, dtype=dtype).contiguous()
        self.times = table.times.to(device=device, dtype=dtype)
        self.widths, self.calls, self.history, self.dim = table.widths, table.calls, table.history, table.dim
        conv = table.history_conv
        self.history_conv = None if conv is None else conv.to(device=device, dtype=dtype)
        self._plan = None

    def history_entry(self, n, z, eps, out=None, tmp=None):
        """What row n's model output adds to the history: ε, or a·z + b·ε (the data prediction),
        then written into ``out`` when given (``tmp``: a scratch buffer like z), same rounding."""
        if self.history_conv is None:
            return eps
        c = self.history_conv[n]
        if out is None:
            return (c[0] * z + c[1] * eps).to(eps.dtype)
        torch.mul(z, c[0], out=out)
        return out.add_(torch.mul(eps, c[1], out=tmp))

    def step(self, n, z, hist, noise=None, offset=0, seed_tensor=None, out=None):
        """Row ``n`` applied to state z with ε history ``hist`` = [ε_n, ε_{n−1}, ...] (only the
        first widths[n] are read): a new tensor like z, or written into ``out``. With ``out`` the
        op is called directly: its kernels check the arguments (and refuse an out that shares
        memory with an input), which spares the loop the Python checks of fastint.ops.step."""
        if out is None or z.dtype == torch.float64:  # float64: fastint.ops.step's unfused path
            return fused_step(z, hist[: self.widths[n]], self.coef, n, self.dim, noise=noise, offset=offset,
                              seed_tensor=seed_tensor, out=out)
        _step_out(z, hist[: self.widths[n]], self.coef, n, self.dim, out, noise, offset, seed_tensor)
        return out

    def buffer_plan(self):
        """(number of state buffers, the buffer row n writes) for the loop without allocation.

        Row n reads z (its own buffer) and the history; a model output may be its input z (or a
        view of it), so an ε entry keeps z's buffer alive while it is in the history. Row n
        writes the lowest-numbered buffer that neither z nor any history entry may hold. With
        the data-prediction history (``history_conv``) the entries live in their own ring and
        two state buffers alternate."""
        if self._plan is None:
            zbuf, hist, outs = -1, [], []  # -1: the caller's zT, never written
            for n, calls in enumerate(self.calls):
                if calls:
                    hist = [zbuf if self.history_conv is None else -1] + hist[: self.history - 1]
                busy = {zbuf, *hist}
                b = next(i for i in range(len(busy) + 1) if i not in busy)
                outs.append(b)
                zbuf = b
            self._plan = (max(outs, default=-1) + 1, tuple(outs))
        return self._plan


def _step_out(z, eps, coef, n, dim, out, noise, offset, seed_tensor):
    """torch.ops.fastint.step_out with in-kernel Philox keyed by seed_tensor (the loop's call)."""
    torch.ops.fastint.step_out(z, eps, coef, n, dim, out, noise, None, offset, seed_tensor)


_F32_MAX = float(torch.finfo(torch.float32).max)
# A coefficient c multiplies a state of unit scale in float32, whose rounding error u·|c|
# (u = 2^-24) reaches the unit scale of the result once |c| > 2^24: no digit of the sum is right.
MAX_COEF = 2.0**24


def check_table(coef, what, max_coef=None):
    """ValueError unless every coefficient is finite in float64 and in float32 (the sampling copy):
    a process or option the maths cannot represent, caught when the table is built, not as NaN
    samples. ``what`` names the process, method and options in the message.

    ``max_coef`` (e.g. MAX_COEF, for a table about to sample in float32 on its own states):
    ValueError also when a coefficient exceeds it, where float32 rounding leaves no correct
    digit of the step (few steps over a strongly decaying process). Not applied to every table:
    a float64 table for analysis, or one that fastint.k_diffusion rescales to the VE state,
    may hold larger entries legitimately."""
    bad = ~torch.isfinite(coef) | (coef.abs() > _F32_MAX)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"the coefficient table of {what} is not finite in float32 (first at row {row}, "
                         f"max |coef| {float(coef.abs().nan_to_num(float('inf')).max()):.3g}): a process parameter "
                         "or method option is beyond what float32 sampling can represent")
    if max_coef is not None:
        big = coef.abs() > max_coef
        if bool(big.any()):
            row = int(big.any(1).nonzero()[0])
            raise ValueError(f"the coefficient table of {what} has coefficients up to {float(coef.abs().max()):.3g} "
                             f"(first at row {row}), beyond {max_coef:.3g}, where float32 rounding leaves no correct "
                             "digit of a step: use more steps (nfe), a smaller option value, or a process that "
                             "decays less over [0, T]")


def _capturing():
    """True while torch.compile traces or a CUDA graph captures: no host read is allowed then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_finite(z, where="sampling", hint="check the model and its inputs"):
    """FloatingPointError if ``z`` holds NaN or Inf: one host read, after the loop (skipped while
    torch.compile traces or a CUDA graph captures). A NaN model output or an overflowing state
    is never passed on silently. ``hint``: what the caller's user can do about it."""
    if _capturing():
        return z
    # min and max propagate NaN and show an Inf: one read of z, no tensor of z's size (isfinite's
    # bool tensor and its reduction cost about ten times more)
    if z.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(z))).all()):
        raise FloatingPointError(f"fastint: {where} produced non-finite values (NaN or Inf): the model output "
                                 f"or the state became non-finite ({hint})")
    return z


def make_table(sde, method, times, denoise=False, **options) -> Table:
    """The Table of ``method`` (any fastint.METHODS name, options as keywords) on ``times``.

    ``times``: a decreasing sequence in (0, T] (fastint.grids makes named ones): the steps go
    from times[n] to times[n + 1]; ``denoise=True`` appends the Tweedie row at times[-1]
    (then a single time is allowed). Tables are cached per (process, method, times, options).
    """
    info = check_method(sde, method)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    t = as_times(sde, times)
    if t.numel() < 2 and not denoise:
        raise ValueError("times must hold at least 2 entries (model times, then the final time) "
                         "unless denoise=True")
    nfe = (t.numel() - 1) * info.calls_per_step + int(denoise)
    op_method, _, opts = resolve(sde, method, nfe, options)
    key = (sde.cache_key(), op_method, tuple(t.tolist()), denoise, tuple(opts))
    hit = _CACHE.get(key)
    if hit is None:
        row_times, coef = torch.ops.fastint.coefficients(sde.process_tensor, sde.knots, float(sde.T), op_method, t,
                                                         denoise, opts)
        check_table(coef, f"{sde!r} with method {method!r} and options {options or {}}")
        conv = None
        if op_method == "conj_ms" and opts[4] == 1.0:  # predict='x0' (VP): x̂0 = (z − σ ε)/α at each row's time
            a, s = sde.alpha(row_times), sde.sigma(row_times)
            conv = torch.stack([1 / a, -s / a], 1)
        hit = Table(coef, row_times, sde.dim, op_method, opts, conv)
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


@torch.library.register_fake("fastint::coefficients")
def _coefficients_fake(process, knots, T, method, times, denoise, options):
    """Output shapes without computing: R = prologue + steps * calls_per_step + denoise rows."""
    info = METHODS.get(method)
    if info is None:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    rows = info.prologue + (times.shape[0] - 1) * info.calls_per_step + int(denoise)
    return process.new_empty(rows), process.new_empty(rows, 7 + 4 * info.history)


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same result
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


# Philox counters: element j of sample i at row n uses counter n * ROW_STRIDE + i * m + j (m the
# x-part size of one sample), so a sample's noise depends only on the key and its index i, never on
# the batch it is drawn in (docs/design.md, "Per-sample determinism").
ROW_STRIDE = 2**44


_STAGGER = 256  # bytes between the starts of the loop's CPU buffers, modulo a page


def _loop_buffer(z, k):
    """A new tensor like z (empty_like's layout) for loop buffer k. On CPU its data starts
    (k mod 15 + 1) * 256 bytes into its allocation: large CPU allocations all start at the same
    offset within a 4 KiB page, and a step whose output shares its input's page offset runs
    about 15 % slower from L3 (docs/performance.md, "The whole loop")."""
    if z.device.type != "cpu":
        return torch.empty_like(z)
    like = torch.empty_like(z, device="meta")
    pad = ((k % 15) + 1) * _STAGGER // z.element_size()
    flat = torch.empty(z.numel() + pad, dtype=z.dtype)
    return flat.as_strided(like.shape, like.stride(), pad)


def run(table, eps_of, z, noise_of=None, seed_tensor=None, progress=False, callback=None, desc="fastint",
        first_index=0, reuse=True, buffers=None, out=None):
    """The sampling loop: for each row n, ε = eps_of(z, n) (a model call, only where the row
    calls the model), then z = row n applied (DeviceTable.step). No host sync, no branch on a
    tensor value: torch.compile(fullgraph=True) and CUDA graphs capture it whole. No allocation
    per step: the states go to buffers made before the first row (DeviceTable.buffer_plan), the
    caller's z is never written.

    ``table``: a DeviceTable on z's device. ``noise_of(n)``: a noise tensor like z or None
    (stochastic methods with caller-supplied noise); ``seed_tensor``: the Philox key (int64 [1]
    on z's device) for in-kernel noise; ``first_index``: the global index of z's first sample
    (its Philox counters, see ROW_STRIDE). ``callback(dict(step, t, z, eps))`` after each row.
    ``reuse=False`` (and any callback) gives every row a new state tensor, for callers that keep
    the states they see. ``buffers``: a list of tensors like z to use (and extend) as the loop's
    buffers, kept by the caller across calls; the result is then a new tensor, or ``out`` (like
    z, sharing no memory with z or the buffers) when given."""
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    per_sample = z[0].numel() // table.dim if z.shape[0] else 0
    base = first_index * per_sample
    if (first_index + z.shape[0]) * per_sample > ROW_STRIDE or len(table.calls) * ROW_STRIDE >= 2**63:
        raise ValueError(f"{first_index + z.shape[0]} samples of {per_sample} elements exceed the Philox counter "
                         f"space of one row (2**44 elements)")
    # Buffers, allocated once: the states (buffer_plan) and, for a data-prediction history, its
    # ring and a scratch tensor. With a callback every state is a new tensor (the callback may keep it).
    reuse = reuse and callback is None
    n_bufs, outs = table.buffer_plan() if reuse else (0, None)
    conv = table.history_conv is not None and reuse
    need = n_bufs + (table.history + 1 if conv else 0)
    pool = [] if buffers is None else buffers
    pool += [_loop_buffer(z, k) for k in range(len(pool), need)]
    bufs = pool[:n_bufs]
    ring = pool[n_bufs:n_bufs + table.history] if conv else None
    tmp = pool[n_bufs + table.history] if conv else None
    last = len(table.calls) - 1
    if out is None and buffers is not None and reuse:  # the caller keeps the buffers: a new result
        out = torch.empty_like(z)
    hist, calls = [], 0
    for n in _progress(range(len(table.calls)), progress, desc):
        noise = None if noise_of is None else noise_of(n)
        offset = n * ROW_STRIDE + base
        dst = out if n == last and out is not None else None if outs is None else bufs[outs[n]]
        if not table.calls[n]:  # a map with no model call (its Q is zero): the eps slot gets z
            z = table.step(n, z, [z], noise=noise, offset=offset, seed_tensor=seed_tensor, out=dst)
            continue
        eps = eps_of(z, n)
        slot = ring[calls % table.history] if conv else None
        hist = [table.history_entry(n, z, eps, slot, tmp)] + hist[: table.history - 1]
        calls += 1
        z = table.step(n, z, hist, noise=noise, offset=offset, seed_tensor=seed_tensor, out=dst)
        if callback is not None:
            callback({"step": n, "t": table.times[n], "z": z, "eps": eps})
    return z
