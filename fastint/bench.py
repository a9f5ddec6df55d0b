"""`fastint bench`: the fused step op and the whole sampling loop against the copy roof.

For every case (process x integrator family x size x dtype x layout) the same update
z' = P z + sum_j Q_j eps_j + S xi is timed side by side in one run:

- ``fused``: ``torch.ops.fastint.step`` (C++ kernel on CPU, Triton on CUDA), a new output per call;
- ``fused_out``: ``torch.ops.fastint.step_out`` into a preallocated output (what the loop does);
- ``eager``: :func:`eager_step`, the same update in ordinary torch ops (fp32 arithmetic,
  coefficients read from the table tensor, noise from ``torch.randn_like``);
- ``compile``: ``torch.compile(eager_step, dynamic=False, fullgraph=True)``;
- ``copy``: ``dst.copy_(src)`` between two preallocated tensors like z: the roof;
- ``clone``: ``z.clone()``, which also pays an allocation (and page faults past the allocator's
  mmap threshold), reported beside it.

Achieved bandwidth is the bytes a single-pass kernel must move (read z and the K eps terms,
write z': (2 + K) * numel * itemsize) over the time; the copy moves 2 * numel * itemsize. The
op is a streaming kernel, so its roof is the copy bandwidth measured in the same run.

The loop cases (:func:`run_loop_case`, ``fastint bench --loop``) time ``Sampler.sample`` with a
trivial model (it returns its input, or a fixed tensor) for ``steps`` rows against the same
preallocated copy: loop bandwidth counts steps * (read z, read eps, write z') bytes.

Timing: every implementation of a case is timed in interleaved rounds (fused, eager, compile,
copy, fused, ...) so that load from other processes hits them alike; the minimum per-call time
is reported (median kept in the JSON). On CUDA, ``triton.testing.do_bench`` over rotating input
sets larger than L2.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time

import torch

# integrator families: name -> (eps terms K, noise). They cover every method's step shape:
FAMILIES = {
    "ddim": (1, None),       # deterministic, one eps: euler, ddim, lambda_ddim
    "ms3": (3, None),        # multistep, three eps: conj_ms k=3
    "em": (1, "philox"),     # stochastic, in-kernel Philox noise: em, sddim
}
FAMILY_METHODS = {"ddim": "euler/ddim/lambda_ddim", "ms3": "conj_ms k=3", "em": "em/sddim (Philox)"}
PROCESSES = {"vp": 1, "psld": 2}  # process -> dim (CLD has PSLD's step shape)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                 "bf16": "bfloat16"}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
LAYOUT_ALIASES = {"cl": "channels_last", "nhwc": "channels_last", "nchw": "contiguous"}
CHANNELS = 8  # z = [B, 8, H, W]: PSLD x and m halves of C = 4 (a latent-diffusion-like state), VP C = 8

QUICK_SIZES = (64 * 1024,)
FULL_SIZES = tuple(s << 10 for s in (16, 64, 256, 1024, 4096, 16384, 32768))


# --------------------------------------------------------------------------------- parsing
def parse_size(text: str) -> int:
    """'16K' -> 16384, '1M' -> 1048576, '4096' -> 4096 (K and M are powers of 2)."""
    t = text.strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = 1 << 10, t[:-1]
    elif t.endswith("M"):
        mult, t = 1 << 20, t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"size {text!r}: expected an element count such as 4096, 16K or 1M") from None
    if n <= 0 or float(t) * mult != n:
        raise ValueError(f"size {text!r}: must be a positive whole number of elements")
    state_shape(n)  # raises when no image shape fits
    return n


def format_size(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def state_shape(n: int) -> tuple[int, ...]:
    """[B, 8, H, W] with n elements: 32x32 images when n is a multiple of 8192, else 8x8."""
    for h in (32, 8):
        if n % (CHANNELS * h * h) == 0:
            return (n // (CHANNELS * h * h), CHANNELS, h, h)
    raise ValueError(f"size {n}: must be a multiple of {CHANNELS * 64} elements (states [B, {CHANNELS}, H, W])")


def _choices(text, valid, aliases, what):
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        name = aliases.get(tok.lower(), tok.lower())
        if name not in valid:
            raise ValueError(f"{what}: unknown {tok!r}; expected some of {', '.join(valid)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"{what}: empty list")
    return out


def parse_dtypes(text):
    return _choices(text, DTYPES, DTYPE_ALIASES, "dtypes")


def parse_layouts(text):
    return _choices(text, LAYOUTS, LAYOUT_ALIASES, "layouts")


def parse_families(text):
    return _choices(text, FAMILIES, {"deterministic": "ddim", "multistep": "ms3", "stochastic": "em"}, "families")


def parse_processes(text):
    return _choices(text, PROCESSES, {"cld": "psld", "vpsde": "vp"}, "processes")


# --------------------------------------------------------------------------------- the update
def eager_step(z, eps: list[torch.Tensor], coef, step: int, dim: int, noisy: bool):
    """The fused op's update in plain torch ops, as a sampler would write it.

    Arithmetic in float32 (half inputs are upcast), coefficients indexed from the table tensor
    (no host sync, so torch.compile traces it whole), noise xi ~ randn, result in z's dtype.
    """
    row = coef[step].unbind()
    zf = z.float()
    if dim == 1:
        out = row[0] * zf
        for j, e in enumerate(eps):
            out = out + row[7 + 4 * j] * e.float()
        if noisy:
            out = out + row[4] * torch.randn_like(zf)
        return out.to(z.dtype)
    c = z.shape[1] // 2
    x, m = zf[:, :c], zf[:, c:]
    xn = row[0] * x + row[1] * m
    mn = row[2] * x + row[3] * m
    for j, e in enumerate(eps):
        ef = e.float()
        ex, em = ef[:, :c], ef[:, c:]
        xn = xn + row[7 + 4 * j] * ex + row[8 + 4 * j] * em
        mn = mn + row[9 + 4 * j] * ex + row[10 + 4 * j] * em
    if noisy:
        xi = torch.randn_like(zf)
        xn = xn + row[4] * xi[:, :c]
        mn = mn + row[5] * xi[:, :c] + row[6] * xi[:, c:]
    return torch.cat([xn, mn], dim=1).to(z.dtype)


def fused_step(z, eps, coef, step, dim, noisy, seed=1234):
    return torch.ops.fastint.step(z, eps, coef, step, dim, None, seed if noisy else None, 0)


def fused_step_out(z, eps, coef, step, dim, noisy, out, seed=1234):
    torch.ops.fastint.step_out(z, eps, coef, step, dim, out, None, seed if noisy else None, 0)
    return out


@dataclasses.dataclass
class Case:
    process: str
    family: str
    size: int
    dtype: str
    layout: str

    @property
    def dim(self):
        return PROCESSES[self.process]

    @property
    def K(self):
        return FAMILIES[self.family][0]

    @property
    def noisy(self):
        return FAMILIES[self.family][1] is not None

    @property
    def name(self):
        return f"{self.process}-{self.family} {format_size(self.size)} {self.dtype} {self.layout}"

    def nbytes(self):
        """Bytes a single-pass kernel must move: read z and K eps, write z' (Philox noise is free)."""
        return (2 + self.K) * self.size * DTYPES[self.dtype].itemsize

    def inputs(self, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = state_shape(self.size)
        fmt = LAYOUTS[self.layout]

        def make():
            return torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[self.dtype], memory_format=fmt)

        z = make()
        eps = [make() for _ in range(self.K)]
        coef = (torch.randn(4, 7 + 4 * self.K, generator=g) * 0.5).to(device)
        return z, eps, coef


# --------------------------------------------------------------------------------- timing
def _time_calls(fn, reps, budget=None):
    """Per-call times of up to ``reps`` calls, stopping early once ``budget`` seconds are spent."""
    ts = []
    spent = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        spent += ts[-1]
        if budget is not None and spent >= budget:
            break
    return ts


def time_side_by_side(fns: dict, min_time: float, rounds: int = 5, max_reps: int = 2000):
    """Per-call times of several callables, timed in interleaved rounds (CPU).

    Each callable is warmed up (its first call timed separately), then called in ``rounds``
    rounds of about min_time / rounds seconds each (at least one call per round; a round stops
    early when its calls run slower than the warm-up suggested, e.g. on a loaded machine).
    Returns {name: {"min_s", "median_s", "calls", "first_call_s"}}.
    """
    est, first = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        est[name] = min(_time_calls(fn, 2))
    samples = {name: [] for name in fns}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                reps = int(min(max_reps, max(1, min_time / rounds / max(est[name], 1e-7))))
                samples[name] += _time_calls(fn, reps, budget=min_time / rounds)
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for name, ts in samples.items():
        ts.sort()
        out[name] = {"min_s": ts[0], "median_s": ts[len(ts) // 2], "calls": len(ts), "first_call_s": first[name]}
    return out


def time_cuda(fns: dict, inputs_sets: int):  # pragma: no cover - needs a GPU
    """Per-call times on CUDA with triton.testing.do_bench (fns rotate through their inputs)."""
    from triton.testing import do_bench

    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms_min, ms_med = do_bench(fn, warmup=25, rep=200, quantiles=[0.0, 0.5])
        out[name] = {"min_s": ms_min * 1e-3, "median_s": ms_med * 1e-3, "calls": None, "first_call_s": first}
    return out


# --------------------------------------------------------------------------------- one case
def run_case(case: Case, device="cpu", compile=True, min_time=0.2, check=True):
    """Times fused / eager / compile / copy for one case; returns its JSON record."""
    z, eps, coef = case.inputs(device)
    dim, noisy, step = case.dim, case.noisy, 1
    rec = dataclasses.asdict(case)
    rec.update(name=case.name, dim=dim, K=case.K, noise="philox" if noisy else "none",
               shape=list(z.shape), bytes=case.nbytes(), methods=FAMILY_METHODS[case.family])

    n_sets = 1
    sets = [(z, eps, coef)]
    if device != "cpu":  # pragma: no cover - rotate inputs so that L2 does not flatter the numbers
        l2 = getattr(torch.cuda.get_device_properties(z.device), "L2_cache_size", 50 << 20)
        n_sets = max(1, min(16, math.ceil(4 * l2 / max(1, case.nbytes()))))
        sets += [case.inputs(device, seed=s) for s in range(1, n_sets)]

    def rotating(f):
        if n_sets == 1:
            return lambda: f(*sets[0])
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % n_sets
            return f(*sets[state["i"]])
        return call

    outs = [torch.empty_like(s[0]) for s in sets]
    srcs = [torch.empty_like(s[0]).copy_(s[0]) for s in sets]
    fns = {
        "fused": rotating(lambda z_, e_, c_: fused_step(z_, e_, c_, step, dim, noisy)),
        "fused_out": rotating(lambda z_, e_, c_: fused_step_out(z_, e_, c_, step, dim, noisy, outs[_index(sets, z_)])),
        "eager": rotating(lambda z_, e_, c_: eager_step(z_, e_, c_, step, dim, noisy)),
    }
    compile_error = None
    if compile:
        try:
            import torch._dynamo as dynamo

            dynamo.reset()  # a fresh cache: no recompile limit across cases
            compiled = torch.compile(eager_step, dynamic=False, fullgraph=True)
            t0 = time.perf_counter()
            compiled(z, eps, coef, step, dim, noisy)  # compile now, so errors surface here
            compile_s = time.perf_counter() - t0
            fns["compile"] = rotating(lambda z_, e_, c_: compiled(z_, e_, c_, step, dim, noisy))
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    fns["copy"] = rotating(lambda z_, e_, c_: outs[_index(sets, z_)].copy_(srcs[_index(sets, z_)]))
    fns["clone"] = rotating(lambda z_, e_, c_: z_.clone())

    if check and not noisy:  # the three agree (up to rounding) before anything is timed
        ref = eager_step(z, eps, coef, step, dim, False).float()
        tol = 1e-4 if case.dtype == "float32" else 2e-2
        got_all = {"fused": fused_step(z, eps, coef, step, dim, False),
                   "fused_out": fused_step_out(z, eps, coef, step, dim, False, torch.empty_like(z))}
        if "compile" in fns:
            got_all["compile"] = compiled(z, eps, coef, step, dim, False)
        for name, got in got_all.items():
            got = got.float()
            if not torch.allclose(got, ref, rtol=tol, atol=tol):
                raise RuntimeError(f"{case.name}: {name} disagrees with eager (max err "
                                   f"{(got - ref).abs().max().item():.3g})")

    timed = time_side_by_side(fns, min_time) if device == "cpu" else time_cuda(fns, n_sets)
    nb, nb_copy = case.nbytes(), 2 * case.size * DTYPES[case.dtype].itemsize
    for name, t in timed.items():
        t["gbps"] = (nb_copy if name in ("copy", "clone") else nb) / t["min_s"] / 1e9
        if name == "compile":
            t["compile_s"] = compile_s  # the first call: tracing, inductor codegen and the C++ build
    for name in ("fused", "fused_out", "eager", "copy", "clone"):
        rec[name] = timed[name]
    rec["compile"] = timed.get("compile")
    if compile_error or not compile:
        rec["compile_error"] = compile_error or "disabled (--no-compile)"
    tf = timed["fused"]["min_s"]
    rec["speedup_vs_eager"] = timed["eager"]["min_s"] / tf
    rec["speedup_vs_compile"] = timed["compile"]["min_s"] / tf if "compile" in timed else None
    rec["copy_gbps"] = timed["copy"]["gbps"]
    rec["clone_gbps"] = timed["clone"]["gbps"]
    rec["fraction_of_copy"] = timed["fused"]["gbps"] / timed["copy"]["gbps"]
    rec["out_fraction_of_copy"] = timed["fused_out"]["gbps"] / timed["copy"]["gbps"]
    return rec


def _index(sets, z):
    """Which input set z belongs to (the rotation of CUDA timings)."""
    return next(i for i, s in enumerate(sets) if s[0] is z)


# --------------------------------------------------------------------------------- the loop
LOOP_SIZES = (1 << 20, 4 << 20, 16 << 20)


class IdentityModel:
    """eps = z: the model returns its input (no work, and an eps that is the loop's own state)."""

    def __call__(self, z, t):
        return z


class ConstModel:
    """eps = a fixed tensor like the state (no work; the step then reads three separate streams)."""

    def __init__(self, like):
        self.eps = torch.randn(like.shape, generator=torch.Generator().manual_seed(1)).to(like)

    def __call__(self, z, t):
        return self.eps


def run_loop_case(size, steps=20, process="psld", method="ddim", models=("identity", "const"), device="cpu",
                  min_time=0.5, **options):
    """Times ``Sampler.sample`` (``steps`` rows, trivial models) against a copy between preallocated
    buffers of the state's size, side by side; returns a JSON record with each loop's bandwidth
    (rows * (2 + 1) * numel * itemsize / time) over the copy's. ``loop_<model>`` writes the result
    into a preallocated ``out`` (like the copy); ``loop_identity_fresh`` returns a new tensor per
    call (its allocation and first-touch page faults included)."""
    import fastint

    sde = {"psld": fastint.PSLD, "vp": fastint.VPSDE, "cld": fastint.CLD}[process]()
    sampler = fastint.Sampler(sde, method, nfe=steps, grid="uniform", denoise=False, **options)
    zT = torch.randn(state_shape(size), generator=torch.Generator().manual_seed(0)).to(device)
    src, dst = torch.empty_like(zT).copy_(zT), torch.empty_like(zT)
    mods = {"identity": IdentityModel(), "const": ConstModel(zT)}
    res = torch.empty_like(zT)
    fns = {f"loop_{m}": (lambda mod=mods[m]: sampler.sample(mod, zT, return_state=True, out=res)) for m in models}
    fns["loop_identity_fresh"] = lambda: sampler.sample(mods["identity"], zT, return_state=True)
    fns["copy"] = lambda: dst.copy_(src)
    fns["clone"] = lambda: src.clone()
    if device == "cpu":
        timed = time_side_by_side(fns, min_time, rounds=5)
    else:  # pragma: no cover - needs a GPU
        timed = time_cuda(fns, 1)
    item = zT.element_size()
    step_bytes = 3 * size * item  # read z and eps, write z'
    rec = {"name": f"{process}-{method} loop {format_size(size)} x {steps} steps", "size": size, "steps": steps,
           "process": process, "method": method, "rows": len(sampler.table), "shape": list(zT.shape),
           "step_bytes": step_bytes}
    copy_gbps = 2 * size * item / timed["copy"]["min_s"] / 1e9
    for name, t in timed.items():
        nbytes = 2 * size * item if name in ("copy", "clone") else step_bytes * len(sampler.table)
        t["gbps"] = nbytes / t["min_s"] / 1e9
        if name.startswith("loop_"):
            t["fraction_of_copy"] = t["gbps"] / copy_gbps
            t["per_step_s"] = t["min_s"] / len(sampler.table)
        rec[name] = t
    rec["copy_gbps"] = copy_gbps
    return rec


# --------------------------------------------------------------------------------- the run
def machine_info(device):
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import fastint
        info["fastint"] = fastint.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        info["cpu"] = platform.processor() or None
    if device != "cpu":  # pragma: no cover
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def build_cases(processes, families, sizes, dtypes, layouts):
    """Every combination of the given lists."""
    return [Case(p, f, s, d, lay) for s in sizes for d in dtypes for lay in layouts for p in processes
            for f in families]


def default_cases():
    """The default run (about 80 s with 1 thread on a busy 2-core machine): every family and process
    at 1M float32 contiguous, a size sweep, the half dtypes and channels_last on the PSLD cases."""
    M = 1 << 20
    cases = build_cases(PROCESSES, FAMILIES, [M], ["float32"], ["contiguous"])
    cases += [Case("psld", "ddim", s, "float32", "contiguous") for s in (16 << 10, 256 << 10, 16 * M)]
    cases += [Case("psld", f, M, d, "contiguous") for d in ("float16", "bfloat16") for f in ("ddim", "ms3")]
    cases += [Case(p, f, M, "float32", "channels_last") for p, f in (("psld", "ddim"), ("psld", "ms3"),
                                                                     ("psld", "em"), ("vp", "ddim"))]
    return cases


def run_bench(cases=None, device="cpu", threads=None, compile=True, min_time=0.2, out=None, progress=True,
              check=True, loop_sizes=(), loop_steps=20):
    """Runs the cases (default: default_cases()) and the loop cases (``loop_sizes``, ``loop_steps``
    rows each); returns the result dict, written as JSON to ``out`` if given."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    import fastint  # noqa: F401  (loads the extension)

    cases = default_cases() if cases is None else list(cases)
    if not cases and not loop_sizes:
        raise ValueError("no cases to run")
    result = {"machine": machine_info(device), "loadavg_before": loadavg(),
              "settings": {"cases": len(cases), "compile": compile, "min_time_s": min_time},
              "bytes_rule": "(2 + K) * numel * itemsize for the step (read z, K eps; write z'); "
                            "2 * numel * itemsize for the copy",
              "cases": []}
    t_start = time.perf_counter()
    bar = _progress(cases, progress)
    for case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case.name)
        result["cases"].append(run_case(case, device=device, compile=compile, min_time=min_time, check=check))
    result["loops"] = [run_loop_case(n, loop_steps, device=device, min_time=max(min_time, 0.5)) for n in loop_sizes]
    result["loadavg_after"] = loadavg()
    result["wall_s"] = time.perf_counter() - t_start
    result["copy_gbps_max"] = max((c["copy_gbps"] for c in result["cases"] + result["loops"]), default=None)
    if out:
        d = os.path.dirname(os.path.abspath(out))
        os.makedirs(d, exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _progress(it, enabled):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc="fastint bench", unit="case", file=sys.stderr, leave=False)


def format_table(result) -> str:
    """The short table `fastint bench` prints."""
    m = result["machine"]
    head = (f"fastint bench: {m.get('gpu') or m.get('cpu')}, {m['threads']} threads, torch {m['torch']}"
            f" ({m['cpu_capability']}); load average {_fmt_load(result.get('loadavg_before'))} before, "
            f"{_fmt_load(result.get('loadavg_after'))} after; {result.get('wall_s', 0):.0f} s")
    cols = (f"{'case':38s} {'fused ms':>9s} {'out= ms':>8s} {'GB/s':>6s} {'copy GB/s':>9s} {'clone GB/s':>10s} "
            f"{'% copy':>6s} {'out= %':>6s} {'x eager':>7s} {'x compile':>9s}")
    lines = [head, cols, "-" * len(cols)]
    for c in result["cases"]:
        xc = f"{c['speedup_vs_compile']:9.2f}" if c["speedup_vs_compile"] else f"{'-':>9s}"
        fo, clone, ofrac = c.get("fused_out"), c.get("clone_gbps"), c.get("out_fraction_of_copy")
        lines.append(f"{c['name']:38s} {c['fused']['min_s'] * 1e3:9.3f} "
                     + (f"{fo['min_s'] * 1e3:8.3f} " if fo else f"{'-':>8s} ")
                     + f"{c['fused']['gbps']:6.1f} {c['copy_gbps']:9.1f} "
                     + (f"{clone:10.1f} " if clone else f"{'-':>10s} ")
                     + f"{100 * c['fraction_of_copy']:5.0f}% "
                     + (f"{100 * ofrac:5.0f}% " if ofrac else f"{'-':>6s} ")
                     + f"{c['speedup_vs_eager']:7.2f} {xc}")
    if result["cases"]:
        lines.append("GB/s: bytes a single-pass kernel moves ((2+K) x numel x itemsize) / min time; % copy: of "
                     "dst.copy_(src) between preallocated tensors in the same run (the roof), out=: the op into a "
                     "preallocated output; x eager / x compile: their time / fused time (> 1: fused faster).")
    if result.get("loops"):
        lines.append(f"{'loop: identity | const | identity, new result':38s} {'ms/step':>9s} {'GB/s':>6s} "
                     f"{'% copy':>6s} | ...  {'copy GB/s':>9s} {'clone GB/s':>10s}")
        for c in result["loops"]:
            parts = []
            for m in ("loop_identity", "loop_const", "loop_identity_fresh"):
                if m in c:
                    parts.append(f"{c[m]['per_step_s'] * 1e3:9.3f} {c[m]['gbps']:6.1f} "
                                 f"{100 * c[m]['fraction_of_copy']:5.0f}%")
            lines.append(f"{c['name']:38s} " + " | ".join(parts) + f" {c['copy_gbps']:9.1f} {c['clone']['gbps']:10.1f}")
        lines.append("loop GB/s: rows x (read z, read eps, write z') bytes / time of Sampler.sample (out= preallocated; "
                     "'new result': a fresh output per call); % copy: of the preallocated copy in the same run.")
    return "\n".join(lines)


NOISY = 3.0  # median / min per-call time above which a case's timing is called noisy


def timing_warnings(result) -> list:
    """Why a result's timings cannot be trusted, as sentences (empty when nothing is off).

    The fused op reads z and K eps and writes z', more bytes than the copy moves, so it cannot run
    above the copy roof (> 100 % of copy bandwidth); a median far above the minimum means the
    calls were disturbed. Both happen when the cores are shared (other load, more threads than
    idle cores).
    """
    cases = result["cases"]
    warns = []
    over = [c for c in cases if c["fraction_of_copy"] > 1.0]
    if over:
        worst = max(over, key=lambda c: c["fraction_of_copy"])
        warns.append(f"{len(over)} of {len(cases)} cases measured the fused op above the copy roof (up to "
                     f"{100 * worst['fraction_of_copy']:.0f} % of copy bandwidth, {worst['name']}), which a kernel "
                     "that moves more bytes than the copy cannot do")
    noisy = [c for c in cases if any(c[k]["median_s"] > NOISY * c[k]["min_s"] for k in ("fused", "eager", "copy"))]
    if noisy:
        warns.append(f"{len(noisy)} of {len(cases)} cases have a median call time above {NOISY:g}x their minimum "
                     f"(e.g. {noisy[0]['name']})")
    if warns:
        m, la = result["machine"], result.get("loadavg_before")
        fix = "rerun with --threads 1, or on an idle machine" if m["threads"] > 1 else "rerun on an idle machine"
        warns.append(f"the timings are inconsistent: {m['threads']} thread(s) on {m['nproc']} CPUs, load average "
                     f"{_fmt_load(la)} before the run; {fix}")
    return warns


def format_markdown(result) -> str:
    """The results as Markdown tables (for docs/performance.md)."""
    lines = ["| case | fused | out= | eager | torch.compile | out= GB/s | copy GB/s | clone GB/s | fused / copy | "
             "out= / copy | x eager | x compile |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        comp = c.get("compile")
        lines.append(
            f"| {c['name']} | {c['fused']['min_s'] * 1e3:.3f} ms | {c['fused_out']['min_s'] * 1e3:.3f} ms | "
            f"{c['eager']['min_s'] * 1e3:.3f} ms | " + (f"{comp['min_s'] * 1e3:.3f} ms" if comp else "-")
            + f" | {c['fused_out']['gbps']:.1f} | {c['copy_gbps']:.1f} | {c['clone_gbps']:.1f} | "
            f"{100 * c['fraction_of_copy']:.0f} % | {100 * c['out_fraction_of_copy']:.0f} % | "
            f"{c['speedup_vs_eager']:.2f} | " + (f"{c['speedup_vs_compile']:.2f}" if comp else "-") + " |")
    if result.get("loops"):
        lines += ["", "| loop | identity model: ms/row | GB/s | / copy | const model: ms/row | GB/s | / copy | "
                      "identity, new result: ms/row | GB/s | / copy | copy GB/s | clone GB/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in result["loops"]:
            cells = []
            for m in ("loop_identity", "loop_const", "loop_identity_fresh"):
                t = c.get(m)
                cells += ([f"{t['per_step_s'] * 1e3:.3f}", f"{t['gbps']:.1f}", f"{100 * t['fraction_of_copy']:.0f} %"]
                          if t else ["-", "-", "-"])
            lines.append(f"| {c['name']} | " + " | ".join(cells) + f" | {c['copy_gbps']:.1f} | {c['clone']['gbps']:.1f} |")
    return "\n".join(lines)


def _fmt_load(la):
    return "?" if not la else "/".join(f"{v:.2f}" for v in la)


def add_arguments(p):
    """The `fastint bench` options (argparse)."""
    p.add_argument("--sizes", default=None,
                   help="comma-separated state sizes in elements, e.g. 16K,1M,32M (K, M = 2^10, 2^20)")
    p.add_argument("--dtypes", default=None, help="comma-separated: float32, float16, bfloat16")
    p.add_argument("--layouts", default=None, help="comma-separated: contiguous, channels_last")
    p.add_argument("--families", default=None,
                   help="comma-separated: ddim (deterministic, 1 eps), ms3 (multistep, 3 eps), em (Philox noise)")
    p.add_argument("--processes", default=None, help="comma-separated: vp (dim 1), psld (dim 2; CLD's shape too)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about 30 s, most of it torch.compile): size "
                        f"{','.join(map(format_size, QUICK_SIZES))}, float32, contiguous, every family and process, "
                        "short timing")
    p.add_argument("--full", action="store_true",
                   help=f"every combination over sizes {','.join(map(format_size, FULL_SIZES))}, all dtypes and "
                        "layouts (252 cases, tens of minutes)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per implementation and case (default 0.2, --quick 0.03)")
    p.add_argument("--out", default="fastint_bench.json", help="JSON output path (default ./fastint_bench.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--loop", action="store_true",
                   help="also time the whole sampling loop (Sampler.sample, PSLD ddim, trivial models) at "
                        f"{','.join(map(format_size, LOOP_SIZES))} (or --sizes) against the preallocated copy")
    p.add_argument("--loop-only", action="store_true", help="only the loop cases (implies --loop)")
    p.add_argument("--loop-steps", type=int, default=20, help="rows of the loop cases (default 20)")
    p.epilog = ("Without --sizes/--dtypes/--layouts/--families/--processes, a default selection of 17 cases runs "
                "(about 80 s with 1 thread on a busy 2-core machine); with any of them, every combination runs, "
                "the unset ones taking 1M, float32, contiguous, all families, both processes.")


def main_from_args(args, error):
    """Runs `fastint bench` from parsed arguments; error(msg) reports bad input (argparse's)."""
    if args.quick and args.full:
        error("--quick and --full exclude each other")
    picked = any(v is not None for v in (args.sizes, args.dtypes, args.layouts, args.families, args.processes))
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else None
        if sizes == []:
            raise ValueError("sizes: empty list")
        dtypes = parse_dtypes(args.dtypes) if args.dtypes else None
        layouts = parse_layouts(args.layouts) if args.layouts else None
        families = parse_families(args.families) if args.families else list(FAMILIES)
        processes = parse_processes(args.processes) if args.processes else list(PROCESSES)
    except ValueError as e:
        error(str(e))
    if args.full:
        cases = build_cases(processes, families, sizes or FULL_SIZES, dtypes or list(DTYPES), layouts or list(LAYOUTS))
    elif args.quick:
        cases = build_cases(processes, families, sizes or QUICK_SIZES, dtypes or ["float32"], layouts or ["contiguous"])
    elif picked:
        cases = build_cases(processes, families, sizes or [1 << 20], dtypes or ["float32"], layouts or ["contiguous"])
    else:
        cases = default_cases()
    if args.threads is not None and args.threads < 1:
        error("--threads must be >= 1")
    if args.min_time is not None and not args.min_time > 0:
        error("--min-time must be > 0")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device != "cpu" and not torch.cuda.is_available():
        error(f"--device {args.device}: no CUDA device on this machine")
    min_time = args.min_time or (0.03 if args.quick else 0.2)
    loop = args.loop or args.loop_only
    loop_sizes = (sizes or LOOP_SIZES) if loop else ()
    if args.loop_steps < 1:
        error("--loop-steps must be >= 1")
    if args.out:  # before the measurements, not after them
        from .cli import check_output_file
        check_output_file("--out", args.out, error)
    res = run_bench([] if args.loop_only else cases, device=args.device, threads=args.threads,
                    compile=not args.no_compile, min_time=min_time, out=args.out, progress=not args.no_progress,
                    loop_sizes=loop_sizes, loop_steps=args.loop_steps)
    print(format_table(res))
    for w in timing_warnings(res):
        print(f"fastint bench: warning: {w}", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}")
    return 0
