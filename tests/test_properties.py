"""Property tests (hypothesis) over random inputs and configurations.

- The fused step op (fastint.ops.step) against fastint.ops.step_reference over storage dtypes,
  layouts (contiguous, permuted, strided slices, an expanded stride-0 ε), sizes (odd, one
  element), aliasing (ε is z, or two history entries are one tensor) and noise modes (none, a
  noise tensor, an int Philox seed, a seed tensor). Accuracy bound as in tests/test_step_op.py:
  the float64 reference r and its scale a (the sum of |terms|) give |out − r| <= ulp(|r| + d)/2 + d,
  d = 16·2^-24·a, plus 1e-5·|S| for in-kernel Philox.
- fastint.Sampler and the fastint.diffusers schedulers over random valid configurations
  (process and its parameters, method, nfe, grid, options, prediction type) with the exact
  model of Gaussian data: either a clean ValueError / TypeError when the configuration is
  built, or a finite result. Never another exception, never NaN or Inf.

The default run draws a few hundred cases; ``pytest --slow`` (tests/conftest.py) raises the
counts to more than 10,000 in all.
"""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fastint  # noqa: E402
from fastint.flow import FLOW_METHODS  # noqa: E402
from fastint.methods import METHODS  # noqa: E402
from fastint.models import GaussianMixture  # noqa: E402
from fastint.ops import philox_normals, step as step_op, step_reference  # noqa: E402

# examples per test: (default run, --slow run); the --slow total is 6000 + 3000 + 1200 = 10,200
EXAMPLES = {"op": (200, 6000), "sampler": (80, 3000), "schedulers": (40, 1200)}
U32 = 2.0**-24
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run_examples(request, name, test):
    """Run the hypothesis test ``test`` with this name's example count (derandomized in the
    default run, so CI is reproducible); returns the count."""
    slow = request.config.getoption("--slow")
    n = EXAMPLES[name][1 if slow else 0]
    settings(max_examples=n, deadline=None, database=None, derandomize=not slow,
             suppress_health_check=list(HealthCheck))(test)()
    return n


# ----------------------------------------------------------------------------- the op
def _ulp(v, dtype):
    fi = torch.finfo(dtype)
    _, e = torch.frexp(torch.clamp(v, min=fi.tiny))
    return fi.eps * torch.ldexp(torch.ones_like(v), e - 1)


def _layout(base, how):
    """A tensor equal to ``base`` stored with the layout ``how``."""
    if how == "contiguous":
        return base.clone()
    if how == "permuted":  # reversed dimension order in memory
        perm = list(range(base.ndim))[::-1]
        return base.permute(perm).contiguous().permute(perm)
    if how == "sliced":  # a storage offset and a stride-2 last dimension
        big = torch.zeros((base.shape[0] + 1,) + base.shape[1:-1] + (2 * base.shape[-1] + 1,), dtype=base.dtype,
                          device=base.device)
        view = big[1:, ..., 1::2]
        view.copy_(base)
        return view
    if how == "expanded":  # stride 0 over the batch: every batch entry is the first one
        return base[:1].expand(base.shape)
    raise AssertionError(how)


@st.composite
def op_cases(draw):
    dim = draw(st.sampled_from([1, 2]))
    spatial = draw(st.lists(st.integers(1, 7), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 3)), dim * draw(st.integers(1, 3)), *spatial)
    return dict(dim=dim, shape=shape, dtype=draw(st.sampled_from(DTYPES)), k=draw(st.integers(1, 3)),
                z_layout=draw(st.sampled_from(["contiguous", "permuted", "sliced"])),
                eps_layouts=draw(st.lists(st.sampled_from(["contiguous", "permuted", "sliced", "expanded"]),
                                          min_size=3, max_size=3)),
                alias=draw(st.sampled_from(["none", "eps0_is_z", "eps1_is_eps0"])),
                noise=draw(st.sampled_from(["none", "tensor", "seed", "seed_tensor"])),
                rows=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**62)), offset=draw(st.integers(0, 2**40)),
                device=draw(st.sampled_from(DEVICES)), data=draw(st.integers(0, 2**31 - 1)))


def _check_op(c):
    gen = torch.Generator().manual_seed(c["data"])
    shape, dtype, dev, k, dim = c["shape"], c["dtype"], c["device"], c["k"], c["dim"]

    def normal():
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=dev)

    z = _layout(normal(), c["z_layout"])
    eps = [_layout(normal(), c["eps_layouts"][j]) for j in range(k)]
    if c["alias"] == "eps0_is_z":
        eps[0] = z
    elif c["alias"] == "eps1_is_eps0" and k > 1:
        eps[1] = eps[0]
    coef = torch.randn(c["rows"], 7 + 4 * k + 2, generator=gen).to(dev)
    step = int(torch.randint(c["rows"], (1,), generator=gen))
    noise = seed = seed_tensor = None
    offset = 0
    if c["noise"] == "tensor":
        noise = _layout(torch.randn(shape, generator=gen).to(dev), c["z_layout"])
    elif c["noise"] in ("seed", "seed_tensor"):
        offset = c["offset"]
        if c["noise"] == "seed":
            seed = c["seed"]
        else:
            seed_tensor = torch.tensor([c["seed"]], dtype=torch.int64, device=dev)
    out = step_op(z, eps, coef, step, dim, noise=noise, seed=seed, offset=offset, seed_tensor=seed_tensor)
    assert out.shape == z.shape and out.dtype == z.dtype and out.device == z.device
    philox = noise is None and c["noise"] != "none"
    xi = philox_normals(c["seed"], offset, shape, dim, dev) if philox else noise
    f64 = dict(compute_dtype=torch.float64, out_dtype=torch.float64)
    ref = step_reference(z, eps, coef, step, dim, xi, **f64)
    assert torch.equal(ref, step_reference(z, eps, coef, step, dim, noise, seed, offset, seed_tensor, **f64))
    scale = step_reference(z.abs(), [e.abs() for e in eps], coef.abs(), step, dim,
                           None if xi is None else xi.abs(), **f64)
    delta = 16 * U32 * scale
    tol = 0.5 * _ulp(ref.abs() + delta, dtype) + delta
    if philox:
        zeros = torch.zeros_like(z)
        tol = tol + 1e-5 * step_reference(zeros, [zeros] * k, coef.abs(), step, dim, torch.ones_like(z), **f64)
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g} for {c}"


def test_op_matches_reference(request):
    """fastint.ops.step equals the float64 reference to the stated bound on every drawn case."""
    run = given(op_cases())(_check_op)
    print(f"\nop cases: {_run_examples(request, 'op', run)}")


# ----------------------------------------------------------------------------- Sampler
def _exact_model(sde, s, prediction):
    """The exact model of data N(0, s² I) under ``sde``, returning ``prediction``."""
    if isinstance(sde, fastint.FlowMatch):  # x = (1 − σ) x0 + σ ε, Var x = (1 − σ)² s² + σ²
        def flow(x, sig):
            g = sig.double().clamp(0, 1).reshape((-1,) + (1,) * (x.ndim - 1))
            var = (1 - g) ** 2 * s**2 + g**2
            x0 = (1 - g) * s**2 / var * x.double()
            out = x0 if prediction == "x0" else (g / var * x.double() - x0)  # v = E[ε|x] − E[x0|x]
            return out.to(x.dtype)
        return flow
    gm = GaussianMixture(sde, torch.zeros(1, 2), torch.tensor([s]))

    def model(z, t):
        t = t.double().clamp(1e-12, sde.T)  # float32 rounding may push a time past T
        eps = gm(z.double(), t)
        if prediction == "eps":
            out = eps
        elif prediction == "score":
            out = sde.eps_to_score(eps, t)
        else:
            x0 = sde.eps_to_x0(eps, z.double(), t)
            a, sg = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
            out = x0 if prediction == "x0" else a * eps - sg * x0
        return out.to(z.dtype)
    return model


def _logu(lo, hi):
    """Log-uniform floats in [10^lo, 10^hi]."""
    return st.floats(lo, hi).map(lambda e: 10.0**e)


@st.composite
def processes(draw):
    kind = draw(st.sampled_from(["vp", "ddpm", "psld", "cld", "flow"]))
    if kind == "vp":
        return fastint.VPSDE(beta_min=draw(st.floats(0, 5)), beta_max=draw(_logu(-1, 2.7)), T=draw(_logu(-1, 1)))
    if kind == "ddpm":
        return fastint.VPSDE.ddpm(n=draw(st.integers(2, 1000)), beta_start=draw(_logu(-5, -3)),
                                  beta_end=draw(_logu(-2.5, -0.5)), T=draw(_logu(-1, 1)))
    common = dict(nu=draw(_logu(-1, 1.3)), m_inv=draw(_logu(-1.5, 1.5)), beta_min=draw(_logu(-1, 1.5)),
                  beta_max=draw(_logu(-1, 1.5)), kappa=draw(st.sampled_from([0.0, 0.04, 1.0])),
                  T=draw(_logu(-0.5, 0.7)), jitter=draw(st.sampled_from([0.0, 1e-9, 1e-4])))
    if kind == "psld":
        return fastint.PSLD(gamma=draw(st.sampled_from([0.0, 0.01, 0.3, 2.0])), **common)
    if kind == "cld":
        return fastint.CLD(**common)
    return fastint.FlowMatch(shift=draw(_logu(-1, 1)))


def _option_value(draw, spec):
    if spec.kind == "bool":
        return draw(st.booleans())
    if spec.kind == "choice":
        return draw(st.sampled_from(spec.choices))
    if spec.kind == "int":
        return int(draw(st.sampled_from(spec.ints)))
    if spec.kind == "count":
        return draw(st.integers(int(spec.low), min(int(spec.high), 60)))
    # lambda_ddim's lam: |lam| <= 10 (its tuned values are far inside). Its allowed range [-1e3, 1e3]
    # admits degenerate integrators (tests/test_hardening.py, test_large_lam_is_degenerate)
    lo, hi = (-10.0, 10.0) if spec.name == "lam" else (spec.low, spec.high)
    return draw(st.floats(lo, hi))


@st.composite
def sampler_cases(draw):
    try:
        sde = draw(processes())
    except (ValueError, TypeError) as e:  # a random process the constructor refuses, cleanly
        return {"refused": e}
    flow = isinstance(sde, fastint.FlowMatch)
    if flow:
        names = list(FLOW_METHODS)
    else:
        names = [m for m, i in METHODS.items() if not (i.vp_only and sde.dim != 1 or i.aug_only and sde.dim != 2)]
    method = draw(st.sampled_from(names if draw(st.integers(0, 9)) else list(METHODS)))  # 1 in 10: any name
    info = METHODS[method]
    options = {}
    if info.alias_of is None and draw(st.booleans()):
        for spec in info.specs:
            if draw(st.booleans()):
                options[spec.name] = _option_value(draw, spec)
    preds = ("flow", "x0") if flow else ("eps", "score", "x0", "v") if sde.dim == 1 else ("eps", "score")
    denoise = draw(st.booleans())
    kw = dict(method=method, denoise=denoise, prediction=draw(st.sampled_from(preds)),
              noise=draw(st.sampled_from(["philox", "torch"])), **options)
    if draw(st.integers(0, 4)) == 0:  # an explicit decreasing grid
        n = draw(st.integers(1, 12))
        top = sde.T
        fr = sorted(set(draw(st.lists(st.floats(1e-4, 1.0), min_size=n, max_size=n))), reverse=True)
        kw["grid"] = [top * f for f in fr]
    else:
        fits = st.integers(1, 20).map(lambda n: n * info.calls_per_step + denoise)
        kw.update(grid=draw(st.sampled_from(list(fastint.grids.GRIDS))),
                  nfe=draw(st.one_of(fits, fits, st.integers(1, 40))),  # mostly an nfe that fits the method
                  t_eps=draw(st.one_of(st.none(), _logu(-5, -1.3))))
    return {"sde": sde, "kw": kw, "s": draw(_logu(-0.6, 0.6)), "seed": draw(st.integers(0, 2**31))}


def _check_sampler(c):
    if "refused" in c:
        return
    sde, kw = c["sde"], c["kw"]
    try:
        S = fastint.Sampler(sde, **kw)
    except (ValueError, TypeError):
        return  # a configuration refused cleanly, when built
    g = torch.Generator().manual_seed(c["seed"])
    zT = sde.prior_sample((3, 2), generator=g)
    try:
        x = S.sample(_exact_model(sde, c["s"], S.prediction), zT, generator=g)  # FloatingPointError fails the test
    except ValueError as e:  # the one refusal at sample time: a table float32 states cannot use
        assert "float64 states can use this table" in str(e), e
        return
    assert x.shape == (3, 2) and bool(torch.isfinite(x).all())


def test_sampler_random_configurations(request):
    """Every random configuration gives a clean ValueError/TypeError or a finite sample."""
    run = given(sampler_cases())(_check_sampler)
    print(f"\nsampler cases: {_run_examples(request, 'sampler', run)}")


# ----------------------------------------------------------------------------- schedulers
@st.composite
def scheduler_cases(draw):
    name = draw(st.sampled_from(["DDIMScheduler", "LambdaDDIMScheduler", "ConjugateMultistepScheduler",
                                 "FlowMatchConjugateScheduler"]))
    cfg = dict(num_train_timesteps=draw(st.sampled_from([2, 10, 100, 1000, 2000])))
    if name == "FlowMatchConjugateScheduler":
        cfg.update(shift=draw(_logu(-1, 1)), solver_order=draw(st.integers(1, 3)))
    else:
        cfg.update(beta_start=draw(_logu(-5, -3)), beta_end=draw(_logu(-2.5, -1.3)),
                   beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
                   timestep_spacing=draw(st.sampled_from(["leading", "trailing", "linspace"])),
                   rescale_betas_zero_snr=draw(st.booleans()),
                   prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])))
        if name == "ConjugateMultistepScheduler":
            cfg.update(solver_order=draw(st.integers(1, 3)), corrector=draw(st.booleans()))
        if name == "LambdaDDIMScheduler":
            cfg.update(lam=draw(st.one_of(st.none(), st.floats(-20, 20))))
    return {"name": name, "cfg": cfg, "steps": draw(st.integers(1, 30)), "s": draw(_logu(-0.6, 0.6)),
            "eta": draw(st.sampled_from([0.0, 0.5, 1.0])), "seed": draw(st.integers(0, 2**31))}


def _check_scheduler(c):
    from fastint import diffusers as fd

    try:
        sch = getattr(fd, c["name"])(**c["cfg"])
        sch.set_timesteps(c["steps"])
    except (ValueError, TypeError):
        return
    s, N = c["s"], c["cfg"]["num_train_timesteps"]
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(2, 1, 3, generator=g)
    flow = c["name"] == "FlowMatchConjugateScheduler"
    for t in sch.timesteps:
        if flow:
            sig = float(t) / N
            var = (1 - sig) ** 2 * s**2 + sig**2
            out = (sig / var - (1 - sig) * s**2 / var) * x  # the exact velocity E[ε − x0 | x]
        else:
            ab = float(sch.alphas_cumprod[int(t)])
            a, sg = math.sqrt(ab), math.sqrt(1 - ab)
            var = ab * s**2 + 1 - ab
            eps, x0 = sg / var * x, a * s**2 / var * x
            pred = sch.config.prediction_type
            out = eps if pred == "epsilon" else x0 if pred == "sample" else a * eps - sg * x0
        extra = {"eta": c["eta"], "generator": g} if c["name"] == "DDIMScheduler" else {}
        x = sch.step(out, t, x, **extra).prev_sample  # FloatingPointError fails the test
    assert bool(torch.isfinite(x).all())


def test_schedulers_random_configurations(request):
    """Every random scheduler configuration is refused cleanly or steps to a finite sample."""
    pytest.importorskip("diffusers")
    run = given(scheduler_cases())(_check_scheduler)
    print(f"\nscheduler cases: {_run_examples(request, 'schedulers', run)}")
