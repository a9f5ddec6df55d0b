"""The out= step op (torch.ops.fastint.step_out) and the sampling loop without per-step allocation.

- step_out equals the functional op and the plain-PyTorch reference (dtypes, strided outputs,
  Philox and tensor noise); out sharing memory with an input is refused (ValueError);
- the loop writes its states into buffers made before the first row: the same few data pointers
  whatever the number of steps, no allocation of state size per step (profiler memory events),
  the caller's zT untouched, and the same result as the allocating loop (a callback switches the
  loop to fresh states) even when the model returns its input (an ε that aliases a state buffer);
- compiled loops agree with eager.
"""
import re

import pytest
import torch
import torch._dynamo as dynamo

import fastint
from fastint.ops import step, step_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g).to(dtype)
    eps = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    coef = torch.randn(3, 7 + 4 * k, generator=g) * 0.5
    return z, eps, coef


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("noise", ["none", "philox", "tensor"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_step_out_equals_functional_and_reference(dtype, dim, noise, layout):
    z, eps, coef = _inputs((3, 4, 5, 6), dtype, 2)
    kw = {"seed": 11, "offset": 7} if noise == "philox" else {}
    if noise == "tensor":
        kw["noise"] = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        out = torch.empty_like(z, memory_format=torch.channels_last)
    elif layout == "transposed":
        out = torch.empty(3, 4, 6, 5, dtype=dtype).transpose(2, 3)
    else:
        out = torch.empty_like(z)
    want = step(z, eps, coef, 1, dim, **kw)
    got = step(z, eps, coef, 1, dim, out=out, **kw)
    assert got is out
    # every path computes the same float terms in the same order: bit-identical to the functional op
    assert torch.equal(out, want)
    ref = step_reference(z, eps, coef, 1, dim, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_step_out_refuses_aliasing_and_bad_out():
    z, eps, coef = _inputs((2, 4, 8, 8), torch.float32, 2)
    noise = torch.randn_like(z)
    cases = [("z", z), ("eps[1]", eps[1]), ("noise", noise), ("z", z.transpose(2, 3))]
    for name, t in cases:
        with pytest.raises(ValueError, match="out must not overlap " + re.escape(name)):
            step(z, eps, coef, 1, 2, noise=noise if name == "noise" else None, out=t)
    # the C++ kernel checks too (a direct call of the op, past the Python checks)
    shifted = torch.empty(z.numel() + 1)[1:].view(z.shape)
    base = torch.empty(z.numel() + 1)
    zz = base[:-1].view(z.shape)
    with pytest.raises(ValueError, match="out must not overlap z"):
        torch.ops.fastint.step_out(zz, eps, coef, 1, 2, base[1:].view(z.shape))
    with pytest.raises(ValueError, match="out must not overlap z"):  # a partial overlap, Python check
        step(zz, eps, coef, 1, 2, out=base[1:].view(z.shape))
    torch.ops.fastint.step_out(z, eps, coef, 1, 2, shifted)  # separate memory: fine
    assert torch.equal(shifted, step(z, eps, coef, 1, 2))
    with pytest.raises(ValueError, match="out must not overlap"):
        torch.ops.fastint.step_out(z, eps, coef, 1, 2, z)
    with pytest.raises(TypeError, match="dtype"):
        step(z, eps, coef, 1, 2, out=torch.empty_like(z, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        step(z, eps, coef, 1, 2, out=torch.empty(2, 4, 8, 7))
    with pytest.raises(ValueError, match="overlapping elements"):
        step(z, eps, coef, 1, 2, out=torch.empty(1, 4, 8, 8).expand(2, 4, 8, 8))


# ------------------------------------------------------------------------------------ the loop
LOOPS = [
    ("vp", "ddim", {}),
    ("psld", "ddim", {}),
    ("vp", "conj_ms", {"k": 3}),
    ("psld", "conj_ms", {"k": 2}),
    ("vp", "conj_ms", {"k": 3, "predict": "x0"}),  # the data-prediction history (its own ring)
    ("vp", "sddim", {"eta": 0.5}),
    ("vp", "sddim", {"eta": 0.5, "noise": "torch"}),
    ("cld", "em", {}),
]
PROCS = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}


def _sampler(proc, method, kw, nfe=8):
    kw = dict(kw)
    try:
        return fastint.Sampler(PROCS[proc](), method, nfe=nfe, **kw)
    except (TypeError, ValueError) as e:
        pytest.skip(f"{method} {kw}: {e}")


def _zT(sampler, shape=(2, 2, 4, 4)):
    return sampler.sde.prior_sample(shape, generator=torch.Generator().manual_seed(1))


class Recorder:
    """A model that records the data pointer of every state it is given; returns its input
    (an ε aliasing the loop's state buffer) or a function of it."""

    def __init__(self, identity):
        self.identity, self.ptrs = identity, []

    def __call__(self, z, t):
        self.ptrs.append(z.data_ptr())
        return z if self.identity else torch.tanh(z) * t[:, None, None, None]


@pytest.mark.parametrize("identity", [True, False], ids=["returns-input", "fresh-output"])
@pytest.mark.parametrize("proc,method,kw", LOOPS, ids=[f"{p}-{m}-{'-'.join(map(str, k.values()))}" for p, m, k in LOOPS])
def test_loop_reuses_buffers_and_equals_allocating_loop(proc, method, kw, identity):
    sampler = _sampler(proc, method, kw, nfe=12)
    zT = _zT(sampler)
    keep = zT.clone()
    rec = Recorder(identity)
    a = sampler.sample(rec, zT, generator=torch.Generator().manual_seed(4), return_state=True)
    assert torch.equal(zT, keep)  # the caller's tensor is never written
    table, _ = sampler.device_table(zT.device)
    n_bufs, outs = table.buffer_plan()
    assert n_bufs <= table.history + 2
    # the model sees zT, then only the loop's few buffers, however many steps
    assert rec.ptrs[0] == zT.data_ptr()
    assert len(set(rec.ptrs[1:])) <= n_bufs < len(rec.ptrs)
    # a callback switches to a fresh state per row (the callback may keep them): same result
    seen = []
    b = sampler.sample(Recorder(identity), zT, generator=torch.Generator().manual_seed(4), return_state=True,
                       callback=lambda d: seen.append(d["z"]))
    assert torch.equal(a, b)
    assert len({t.data_ptr() for t in seen}) == len(seen)


def _big_allocations(fn, nbytes):
    """Number of CPU allocations of at least ``nbytes`` while fn runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return sum(1 for e in events if e.name() == "[memory]" and e.nbytes() >= nbytes)


@pytest.mark.parametrize("proc,method,kw", [LOOPS[1], LOOPS[2], LOOPS[4], LOOPS[5]],
                         ids=["psld-ddim", "vp-conj_ms3", "vp-conj_ms3-x0", "vp-sddim"])
def test_loop_allocates_nothing_per_step(proc, method, kw):
    """Allocations of a state's size do not grow with the number of steps: the loop's buffers are
    made once (and kept by the Sampler between calls), the result is the one new tensor, none with out=."""
    for nfe in (6, 24):
        sampler = _sampler(proc, method, kw, nfe=nfe)
        zT = _zT(sampler, (4, 2 * sampler.sde.dim, 16, 16))
        model = lambda z, t: z  # noqa: E731
        table, _ = sampler.device_table(zT.device)
        n_bufs = table.buffer_plan()[0] + (table.history + 1 if table.history_conv is not None else 0)
        fresh = _big_allocations(lambda: sampler.sample(model, zT, check_finite=False), zT.nbytes)
        assert fresh == n_bufs + 1  # the buffers, then the result
        again = _big_allocations(lambda: sampler.sample(model, zT, check_finite=False), zT.nbytes)
        assert again == 1
        out = torch.empty_like(zT)
        none = _big_allocations(lambda: sampler.sample(model, zT, check_finite=False, out=out, return_state=True,
                                                       seed=5), zT.nbytes)
        assert none == 0
        assert torch.equal(out, sampler.sample(model, zT, return_state=True, seed=5))
        sampler.free_buffers()
        assert _big_allocations(lambda: sampler.sample(model, zT, check_finite=False), zT.nbytes) == n_bufs + 1
        # the allocating loop (a callback) makes a new state per row: this test can tell them apart
        assert _big_allocations(lambda: sampler.sample(model, zT, check_finite=False, callback=lambda d: None),
                                zT.nbytes) >= nfe


def test_results_are_not_the_kept_buffers():
    """Two calls return separate tensors (the kept buffers never leave the loop)."""
    sampler = _sampler("vp", "conj_ms", {"k": 3})
    zT = _zT(sampler)
    model = lambda z, t: z  # noqa: E731
    a = sampler.sample(model, zT, return_state=True)
    keep = a.clone()
    b = sampler.sample(model, zT * 2, return_state=True)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, keep)
    one_row = fastint.Sampler(fastint.VPSDE(), "ddim", nfe=1, denoise=False)
    with pytest.raises(ValueError, match="overlap"):  # the last row reads zT: out=zT is refused
        one_row.sample(model, zT, out=zT, return_state=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("proc,method,kw", [LOOPS[1], LOOPS[2], LOOPS[5], ("vp", "conj_ms", {"k": 3, "prediction": "x0"})],
                         ids=["psld-ddim", "vp-conj_ms3", "vp-sddim", "vp-conj_ms3-x0-model"])
def test_compiled_loop_equals_eager(proc, method, kw, backend):
    dynamo.reset()
    sampler = _sampler(proc, method, kw, nfe=6)
    zT = _zT(sampler)
    model = lambda z, t: torch.tanh(z) * t[:, None, None, None]  # noqa: E731
    table, pc = sampler.device_table(zT.device)
    key = sampler.philox_key(torch.Generator().manual_seed(2))
    eager = sampler.run(model, zT, table, pc, key)
    compiled = torch.compile(sampler.run, backend=backend, fullgraph=True)(model, zT, table, pc, key)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    dynamo.reset()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_loop_buffers_start_at_distinct_page_offsets(layout):
    """Large CPU allocations share one offset within a 4 KiB page; the loop's buffers start at
    distinct offsets past it (a step whose output shares its input's page offset runs slower
    from L3). They keep z's layout."""
    zT = torch.randn(8, 8, 64, 64)  # 1 MiB: page-aligned by the allocator
    if layout == "channels_last":
        zT = zT.contiguous(memory_format=torch.channels_last)
    sampler = fastint.Sampler(fastint.PSLD(), "conj_ms", nfe=8, grid="uniform", denoise=False, k=2)
    sampler.sample(lambda x, t: 0.1 * x, zT, return_state=True)
    bufs = sampler._buffers[1]
    assert len(bufs) >= 2
    # each starts a different multiple of 256 bytes into its own allocation (the allocator gives
    # every large block the same page offset, so these differ within the page)
    offsets = [b.data_ptr() - b.untyped_storage().data_ptr() for b in bufs]
    assert all(o > 0 and o % 256 == 0 and o < 4096 for o in offsets) and len(set(offsets)) == len(offsets), offsets
    for b in bufs:
        assert b.shape == zT.shape and b.stride() == zT.stride()


PREDICTION_LOOPS = [("vp", "conj_ms", {"k": 3}, "x0"), ("vp", "conj_ms", {"k": 2, "corrector": "every"}, "v"),
                    ("vp", "conj_ms", {"k": 3}, "score"), ("psld", "cspsd", {}, "score"), ("vp", "sddim", {}, "x0")]


@pytest.mark.parametrize("proc,method,kw,pred", PREDICTION_LOOPS,
                         ids=[f"{p}-{m}-{pr}" for p, m, _, pr in PREDICTION_LOOPS])
def test_prediction_conversion_ring(proc, method, kw, pred):
    """A non-ε model's outputs are converted into a ring of buffers made once per call: the same
    bits as a fresh ε per model call (what a callback gets), and no allocation per step."""
    counts = []
    for nfe in (6, 24):
        sampler = _sampler(proc, method, dict(kw, prediction=pred), nfe=nfe)
        zT = _zT(sampler, (4, 2 * sampler.sde.dim, 16, 16))
        model = lambda z, t: torch.tanh(z) * (0.5 + t[:, None, None, None])  # noqa: E731
        a = sampler.sample(model, zT, return_state=True, seed=3)
        b = sampler.sample(model, zT, return_state=True, seed=3, callback=lambda d: None)
        assert torch.equal(a, b)  # a ring too short for the history would differ here (multistep)
        out, identity = torch.empty_like(zT), (lambda z, t: z)
        sampler.sample(identity, zT, out=out, return_state=True, seed=3)  # the loop's kept buffers
        counts.append(_big_allocations(lambda: sampler.sample(identity, zT, out=out, return_state=True, seed=3,
                                                              check_finite=False), zT.nbytes))
        table, _ = sampler.device_table(zT.device)
        assert counts[-1] <= table.history + 1  # the ring, nothing per step
    assert counts[0] == counts[1]
