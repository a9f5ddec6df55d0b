"""Flow-matching study: diffusers' rectified-flow schedulers used as a user uses them, against fastint's.

    python bench/study_flow.py                # full run (~1 min on 1 core): bench/results/study_flow.{json,md},
                                              # docs/flow_study.png
    python bench/study_flow.py --quick        # smoke run (~10 s): writes to /tmp/fastint_study_flow
    python bench/study_flow.py --peers-only --out-dir /tmp/study_flow
                                              # the diffusers rows only, written elsewhere
    python bench/study_flow.py --contestants fastint --fastint "k=3" '{"solver_order": 3}' --commit --merge
                                              # (re-)run fastint rows only, merged into the committed results

Method
------
Path and model. x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1]; the model predicts the
velocity v = eps - x0, and sampling integrates dx/dsigma = v from sigma = 1 (pure noise) to 0
(data), diffusers' FlowMatch convention; the model is called with timestep = sigma * 1000.
The problems are Gaussian mixtures x0 ~ sum_k w_k N(mu_k, diag(s_k^2)), for which
v(x, sigma) = E[eps - x0 | x_sigma = x] is known in closed form (float64): with a = 1 - sigma,
V_k = a^2 s_k^2 + sigma^2 and responsibilities r_k(x) proportional to w_k N(x; a mu_k, V_k)
(log-sum-exp),

    v(x, sigma) = sum_k r_k(x) [ (x - a mu_k) (sigma - a s_k^2) / V_k - mu_k ],

which equals (x - E[x0 | x]) / sigma but has no division by sigma, so it holds on all of
[0, 1]: at sigma = 1, v = x - sum_k w_k mu_k; at sigma = 0, v = -x. Each bracket is the exact
derivative of the Gaussian transport map a mu_k + sqrt(V_k) z. ``check_velocity`` verifies the
formula at every run (finite differences of that map; (x - E[x0|x])/sigma from Bayes' rule;
Monte-Carlo E[(eps - x0) g(x)] = E[v(x) g(x)]; the two endpoints).

Problems (each at shift 1 and shift 3): a 2-D mixture of 8 modes, a 64-D mixture of 8 modes
(component std 0.1-0.3, means of norm ~1.5) and a 3-D mixture of 6 narrow modes (std 0.02-0.05).

Contestants. Every contestant is a (label, class, overrides) triple built the way a user swaps
schedulers: ``Cls.from_config(base, **overrides)`` from one base config, that of
``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)``. UniPC and
DPM-Solver++ get ``use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift``
on top (they ignore the base's ``shift``). A contestant whose overrides do not all show up in
``sch.config`` (from_config drops unknown keys and only logs them) or whose from_config raises
is recorded as *skipped*, never silently re-run with the class defaults. fastint's
``FlowMatchConjugateScheduler`` rows are included when the class exists; ``--fastint LABEL JSON``
adds rows with other overrides.

Loop (the standard diffusers one, each scheduler at its own sigmas and timesteps):

    sch.set_timesteps(n, device="cpu")      # + mu = log(shift) if config.use_dynamic_shifting
    x = noise * sch.init_noise_sigma        # 1 where the attribute is missing (FlowMatch classes)
    for t in sch.timesteps: x = sch.step(model(x, t), t, x).prev_sample

The model is evaluated at the scheduler's own sigma of that call, ``sch.sigmas[i]`` for the
i-th call (checked: |timesteps[i] - 1000 sigmas[i]| <= 1 for every class here), because UniPC
and DPM-Solver++ with flow sigmas pass *integer* timesteps int(1000 sigma), truncated: a model
reading sigma = t / 1000 is then evaluated up to 1e-3 off the state's sigma. The "sigma = t/1000"
baseline rows show what that truncation costs (it is what a network that embeds the timestep sees).

Calls, not steps. The model is wrapped in a call counter. For a target of C calls each
contestant runs with the largest ``num_inference_steps`` n whose ``len(sch.timesteps)`` (a dry
run of set_timesteps) is <= C, and the count is checked against the counter. Heun makes 2n - 1
calls for n steps (n - 1 Heun steps and a last Euler step to sigma = 0), so it only hits odd C;
where a contestant makes fewer calls than the column says, the cell shows the count used.

Reference. For one fixed batch of noises x(1), DOP853 (rtol = atol = 1e-10, float64, the batch as
one system) integrates dx/dsigma = v from sigma = 1 to 0. Schedulers that start below sigma = 1
(DPM-Solver++ with flow sigmas starts at shift(0.999), UniPC at 1 - 1e-6) still read x = noise
there; their ``err`` counts that, and ``err_start`` (JSON, footnote) is the error against a
reference solved from their own (sigma_0, noise).

Metrics. ``err``: RMS over the batch and the coordinates of x_end - x_ref(0) (``err_l2`` in the
JSON: mean over the batch of the l2 norm, study_dropin's measure). ``floor`` ("one-jump floor"):
the error of the exact path down to the sigma of the last model call followed by one exact
x0 = x - sigma v jump to 0, which is what every scheduler here does last (a first-order Euler /
x0 step); it depends on where the last call is: FlowMatch Euler/Heun at shift(shift(0.001))
(set_timesteps shifts the sigma_min that __init__ already shifted: 0.001 at shift 1, 0.00893 at
shift 3), UniPC/DPM at shift(0.001 + 0.999/n) and shift(0.999/n), so their last step is a long
x0 jump (0.2 at 5 calls, 0.43 at shift 3). ``ratio``: a fastint row's err over the best
(smallest) finite err of the peers in the same problem, shift and column.

diffusers 0.42.1 details: FlowMatch Euler/Heun and DPM-Solver++ cast the state to float32 inside
step() whatever the model's dtype (UniPC keeps it; every class's sigmas are float32), a ~1e-7
relative floor far below the errors here; UniPC bh1 ending at
sigma = 0 gives NaN (as in study_dropin: B_h = h = -inf); with flow sigmas at shift 3, UniPC from
334 steps and DPM-Solver++ from 351 steps get repeated integer timesteps and their step-index
lookup then breaks (irrelevant at <= 50 calls; the sanity runs stay below it).

Sanity (asserted): the velocity checks above; the first sigma of every run > 0.99; the calls
counted = len(timesteps); FlowMatch Heun at 500 steps and UniPC bh2 at 200 steps end within
1e-2 x RMS(x_ref) of the reference in every problem (the run exits non-zero otherwise, after
writing its results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_DIR = "/tmp/fastint_study_flow"
CALLS = (4, 5, 6, 8, 10, 12, 15, 20, 30, 50)
SHIFTS = (1.0, 3.0)
N_TRAIN = 1000
# sanity runs (label, steps) whose err must be below CONVERGENCE_TOL times the RMS of x_ref. UniPC
# stays below 334 steps: from there on (shift 3; DPM-Solver++ from 351) two flow sigmas truncate to
# the same integer timestep and its step-index lookup skips a step (an AssertionError in step()).
CONVERGENCE = (("FlowMatch Heun", 500), ("UniPC bh2", 200))
CONVERGENCE_TOL = 1e-2


# ------------------------------------------------------------------------------ contestants
@dataclass(frozen=True)
class Contestant:
    """One scheduler as a user configures it: ``module.cls.from_config(base, **overrides)``.

    ``flow``: add use_flow_sigmas / flow_prediction / flow_shift (the DDPM-family classes).
    ``sigma_from``: how the model turns its call into sigma: "schedule" (sch.sigmas[i]) or
    "timestep" (t / 1000, what a network embedding the timestep sees).
    """

    label: str
    cls: str  # "diffusers.X" or "fastint.diffusers.X"
    overrides: dict = field(default_factory=dict)
    kind: str = "peer"  # "peer" (in the best-of-peers), "baseline" or "fastint"
    flow: bool = False
    sigma_from: str = "schedule"

    def resolve(self):
        """The class, or None where its module does not import or lacks it."""
        import importlib

        module, _, name = self.cls.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:  # e.g. fastint's extension not built, or stale
            return None


DPM, UNIPC = "diffusers.DPMSolverMultistepScheduler", "diffusers.UniPCMultistepScheduler"
FMC = "fastint.diffusers.FlowMatchConjugateScheduler"
PEER_CONTESTANTS = [
    Contestant("FlowMatch Euler", "diffusers.FlowMatchEulerDiscreteScheduler"),
    Contestant("FlowMatch Heun", "diffusers.FlowMatchHeunDiscreteScheduler"),
    Contestant("DPM-Solver++ 2M", DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}, flow=True),
    Contestant("DPM-Solver++ 3M", DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3}, flow=True),
    Contestant("UniPC bh1", UNIPC, {"solver_type": "bh1", "solver_order": 2}, flow=True),
    Contestant("UniPC bh2", UNIPC, {"solver_type": "bh2", "solver_order": 2}, flow=True),
    Contestant("UniPC bh2 order 3", UNIPC, {"solver_type": "bh2", "solver_order": 3}, flow=True),
    # the same two with the model reading sigma = t / 1000 from their integer timesteps
    Contestant("DPM-Solver++ 2M, σ = t/1000", DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}, flow=True,
               kind="baseline", sigma_from="timestep"),
    Contestant("UniPC bh2, σ = t/1000", UNIPC, {"solver_type": "bh2", "solver_order": 2}, flow=True,
               kind="baseline", sigma_from="timestep"),
]
FASTINT_CONTESTANTS = [
    Contestant("fastint FMC", FMC, kind="fastint"),  # the class defaults, whatever they are
    # the alternatives the defaults were chosen against (docs/results.md, "Flow matching")
    Contestant("fastint FMC order 3", FMC, {"solver_order": 3}, kind="fastint"),
    Contestant("fastint FMC no corrector", FMC, {"corrector": False}, kind="fastint"),
    Contestant("fastint FMC interp sigma", FMC, {"interp": "sigma"}, kind="fastint"),
    Contestant("fastint FMC interp logsnr", FMC, {"interp": "logsnr"}, kind="fastint"),
]


def contestants_for(args):
    """The contestant list of this run: peers, fastint's (if the class exists) and --fastint rows."""
    fast = FASTINT_CONTESTANTS + [Contestant(f"fastint FMC {lab}", FMC, over, kind="fastint")
                                  for lab, over in args.fastint]
    out = list(PEER_CONTESTANTS)
    if args.peers_only:
        pass
    elif fast[0].resolve() is not None:
        out += fast
    else:
        print(f"no fastint rows: {fastint_status()}", file=sys.stderr)
    return [c for c in out if matches(c.label, args.contestants)]


def fastint_status():
    """Why fastint's flow scheduler is missing (or "available")."""
    try:
        import fastint.diffusers as fd
    except ImportError as e:
        return f"fastint.diffusers does not import ({e})"
    return "available" if hasattr(fd, FMC.rpartition(".")[2]) else f"{FMC} does not exist"


def base_config(shift):
    """The one base config every contestant is built from: FlowMatch Euler's at this shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=shift).config)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_scheduler(con, shift):
    """(scheduler, None) or (None, why it is skipped) for contestant ``con`` at ``shift``."""
    cls = con.resolve()
    if cls is None:
        return None, f"{con.cls} does not exist"
    overrides = dict(con.overrides)
    if con.flow:
        overrides = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift, **overrides}
    try:
        sch = cls.from_config(base_config(shift), **overrides)
    except (TypeError, ValueError, NotImplementedError) as e:
        return None, f"from_config raised {type(e).__name__}: {e}"
    ignored = [k for k, v in overrides.items() if k not in sch.config or sch.config[k] != v]
    if ignored:
        return None, f"from_config ignored {', '.join(f'{k}={overrides[k]!r}' for k in ignored)} (not an option)"
    return sch, None


def set_timesteps(sch, n, shift):
    """sch.set_timesteps(n) as a pipeline calls it (mu = log(shift) where the shift is dynamic:
    exp-type time_shift(mu, 1, s) is the static shift exp(mu))."""
    if sch.config.get("use_dynamic_shifting"):
        sch.set_timesteps(n, device="cpu", mu=math.log(shift))
    else:
        sch.set_timesteps(n, device="cpu")


# ------------------------------------------------------------------------------ problems
@dataclass
class Mixture:
    """Gaussian mixture x0 ~ sum_k w_k N(mu_k, diag(var_k)), exact in float64: means/variances [K, d]."""

    name: str
    means: torch.Tensor
    variances: torch.Tensor
    log_weights: torch.Tensor

    @property
    def dim(self):
        return self.means.shape[1]

    def _parts(self, x, sigma):
        """(responsibilities [B, K], x - a mu [B, K, d], V [K, d]) at sigma, a = 1 - sigma."""
        a = 1.0 - sigma
        var = a * a * self.variances + sigma * sigma  # [K, d], > 0 on [0, 1]
        diff = x[:, None, :] - a * self.means[None]
        logp = self.log_weights - 0.5 * (diff * diff / var + var.log()).sum(-1)
        return torch.softmax(logp, dim=1), diff, var

    def velocity(self, x, sigma):
        """v = E[eps - x0 | x_sigma = x], x [B, d] float64; valid for sigma in [0, 1] (no 1/sigma)."""
        a = 1.0 - sigma
        resp, diff, var = self._parts(x, sigma)
        vk = diff * ((sigma - a * self.variances) / var) - self.means[None]
        return torch.einsum("bk,bkd->bd", resp, vk)

    def posterior_mean(self, x, sigma):
        """E[x0 | x_sigma = x] by Bayes' rule per component (used to check ``velocity``)."""
        a = 1.0 - sigma
        resp, diff, var = self._parts(x, sigma)
        mk = self.means[None] + (a * self.variances / var) * diff
        return torch.einsum("bk,bkd->bd", resp, mk)

    def sample(self, n, generator):
        """(x0, component index) draws."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * z, k


def _mixture(name, means, stds, weights):
    means = torch.as_tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64)
    if stds.ndim == 1:  # isotropic per component
        stds = stds[:, None].expand_as(means)
    w = torch.as_tensor(weights, dtype=torch.float64)
    return Mixture(name, means, stds.clone() ** 2, torch.log(w / w.sum()))


def make_problems():
    """name -> Mixture: the three analytic problems (deterministic)."""
    g = torch.Generator().manual_seed(4321)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    ring = torch.stack([ang.cos(), ang.sin()], 1) * 1.2 + 0.15 * n(8, 2)
    pbs = [
        _mixture("2-D, 8 modes", ring, 0.1 + 0.2 * r(8), 0.5 + r(8)),
        _mixture("64-D, 8 modes", n(8, 64) * (1.5 / math.sqrt(64)), 0.1 + 0.2 * r(8), 0.5 + r(8)),
        _mixture("3-D, 6 narrow modes (std 0.02-0.05)", n(6, 3) * 0.8, 0.02 + 0.03 * r(6), 0.5 + r(6)),
    ]
    return {p.name: p for p in pbs}


def check_velocity(pb, seed=0):
    """Assert the closed-form velocity on ``pb`` (a few ms): endpoints, Bayes' rule, the Gaussian
    transport map by finite differences, and E[(eps - x0) g(x)] = E[v(x) g(x)] by Monte Carlo."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, pb.dim, generator=g, dtype=torch.float64)
    w_mu = (pb.log_weights.exp()[:, None] * pb.means).sum(0)
    assert torch.allclose(pb.velocity(x, 1.0), x - w_mu, atol=1e-12), "v at sigma = 1"
    assert torch.allclose(pb.velocity(x, 0.0), -x, atol=1e-12), "v at sigma = 0"
    for s in (0.9, 0.5, 0.1, 1e-3):
        want = (x - pb.posterior_mean(x, s)) / s
        assert torch.allclose(pb.velocity(x, s), want, rtol=1e-8, atol=1e-8 / s), f"v vs Bayes at sigma = {s}"
    # each bracket is d/dsigma of the map a mu_k + sqrt(V_k) z (one component: r_k = 1)
    one = Mixture("one", pb.means[:1], pb.variances[:1], torch.zeros(1, dtype=torch.float64))
    z = torch.randn(64, pb.dim, generator=g, dtype=torch.float64)

    def path(s):
        return (1 - s) * one.means + ((1 - s) ** 2 * one.variances + s * s).sqrt() * z

    for s in (0.95, 0.5, 0.05):
        h = 1e-5
        fd = (path(s + h) - path(s - h)) / (2 * h)
        assert torch.allclose(one.velocity(path(s), s), fd, rtol=1e-6, atol=1e-6), f"finite differences at {s}"
    # Monte Carlo: v is the regression of eps - x0 on x, so E[(eps - x0 - v(x)) g(x)] = 0 for g = 1, x
    n = min(200_000, max(10_000, 600_000 // pb.dim))
    x0, _ = pb.sample(n, g)
    eps = torch.randn(n, pb.dim, generator=g, dtype=torch.float64)
    for s in (0.8, 0.3):
        xs = (1 - s) * x0 + s * eps
        res = eps - x0 - torch.cat([pb.velocity(xc, s) for xc in xs.split(10_000)])
        for gx in (torch.ones_like(xs), xs):
            m = (res * gx).mean(0)
            se = (res * gx).std(0) / math.sqrt(n)
            assert (m.abs() <= 5 * se + 1e-12).all(), f"Monte Carlo at sigma = {s}: {m} vs se {se}"


# ------------------------------------------------------------------------------ reference
class Reference:
    """DOP853 solutions of dx/dsigma = v(x, sigma) for one problem and one batch of noises.

    ``main``: from (sigma = 1, noise) with the states at ``ends`` (every sigma some run's last call
    is at, and 0). ``from_start(sigma0)``: the endpoint from (sigma0, noise), cached per sigma0.
    """

    def __init__(self, problem, noise, ends, rtol=1e-10, atol=1e-10):
        self.problem, self.noise = problem, noise.to(torch.float64)
        self.rtol, self.atol = rtol, atol
        self.solves, self.seconds = 0, 0.0
        self.main = self._solve(1.0, sorted({0.0, *[e for e in ends if e < 1.0]}, reverse=True))
        self._starts = {1.0: self.main[0.0]}

    def _solve(self, sigma0, ends):
        from scipy.integrate import solve_ivp

        t0 = time.perf_counter()
        shape, vel = self.noise.shape, self.problem.velocity

        def rhs(s, x):
            return vel(torch.from_numpy(x).view(shape), s).numpy().ravel()

        sol = solve_ivp(rhs, (sigma0, 0.0), self.noise.numpy().ravel(), method="DOP853", rtol=self.rtol,
                        atol=self.atol, t_eval=ends)
        if not sol.success:
            raise RuntimeError(f"reference solve failed ({self.problem.name}, sigma0={sigma0}): {sol.message}")
        self.solves += 1
        self.seconds += time.perf_counter() - t0
        return {e: torch.from_numpy(np.ascontiguousarray(sol.y[:, i])).view(shape) for i, e in enumerate(ends)}

    def at(self, sigma):
        """The main solution at ``sigma`` (one of ``ends``), or None."""
        for s, x in self.main.items():
            if abs(s - sigma) <= 1e-9 + 1e-7 * s:
                return x
        return None

    def from_start(self, sigma0):
        key = round(float(sigma0), 9)
        if key not in self._starts:
            self._starts[key] = self._solve(key, [0.0])[0.0]
        return self._starts[key]


# ------------------------------------------------------------------------------ running
class CountingModel:
    """The exact velocity model in diffusers' convention, model(x, t) -> v, counting its calls.

    sigma of call i: ``sigmas[i]`` (the scheduler's own, set per run) or t / 1000.
    """

    def __init__(self, problem):
        self.problem = problem
        self.calls, self.sigmas, self.sigma_from = 0, None, "schedule"

    def reset(self, sigmas, sigma_from):
        self.calls, self.sigmas, self.sigma_from = 0, sigmas, sigma_from

    def sigma(self, t):
        if self.sigma_from == "schedule" and self.sigmas is not None:
            return float(self.sigmas[self.calls])
        return float(t) / N_TRAIN

    def __call__(self, x, t):
        s = self.sigma(t)
        self.calls += 1
        return self.problem.velocity(x.to(torch.float64), s).to(x.dtype)


def schedule_of(sch):
    """(per-call sigmas or None, first sigma, sigma of the last call) after set_timesteps, with
    the timestep/sigma alignment asserted where the scheduler has sigmas."""
    ts = sch.timesteps.to(torch.float64)
    sig = getattr(sch, "sigmas", None)
    if not (isinstance(sig, torch.Tensor) and sig.numel() >= len(ts)):
        return None, float(ts[0]) / N_TRAIN, float(ts[-1]) / N_TRAIN
    per_call = sig[:len(ts)].to(torch.float64)
    gap = (ts - N_TRAIN * per_call).abs().max().item()
    assert gap <= 1.0 + 1e-3, f"{type(sch).__name__}: timesteps are not 1000 * sigmas (max gap {gap})"
    return per_call, float(per_call[0]), float(per_call[-1])


_STEPS_CACHE = {}


def steps_for_calls(con, shift, calls):
    """The largest num_inference_steps whose timesteps make <= ``calls`` model calls -> (n, calls
    it makes), or (None, why) when none does; from dry runs of set_timesteps, cached."""
    key = (con.label, con.cls, json.dumps(con.overrides, sort_keys=True), shift, calls)
    if key not in _STEPS_CACHE:
        _STEPS_CACHE[key] = _steps_for_calls(con, shift, calls)
    return _STEPS_CACHE[key]


def _steps_for_calls(con, shift, calls):
    best = None
    for n in range(1, calls + 1):
        sch, why = build_scheduler(con, shift)
        if sch is None:
            return None, why
        try:
            set_timesteps(sch, n, shift)
        except (TypeError, ValueError, NotImplementedError) as e:
            return None, f"set_timesteps raised {type(e).__name__}: {e}"
        k = len(sch.timesteps)
        if k > calls:
            break
        if best is None or k >= best[1]:
            best = (n, k)
    return best if best else (None, f"no step count makes <= {calls} calls")


@dataclass
class Run:
    """What one loop produced: the final state and what is needed to score it."""

    x: torch.Tensor
    steps: int
    calls: int
    sigma0: float
    sigma_last: float
    dtype: str
    sched_s: float  # wall time inside the scheduler's own calls


def flow_loop(sch, model, con, noise, steps, shift):
    """The standard diffusers loop at the scheduler's own timesteps; model calls are counted."""
    t0 = time.perf_counter()
    set_timesteps(sch, steps, shift)
    per_call, sigma0, sigma_last = schedule_of(sch)
    assert sigma0 > 0.99, f"{con.label}: first sigma {sigma0} (not ~1)"
    x = noise * float(getattr(sch, "init_noise_sigma", 1.0))
    sched = time.perf_counter() - t0
    model.reset(per_call, con.sigma_from)
    for t in sch.timesteps:
        t0 = time.perf_counter()
        inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        sched += time.perf_counter() - t0
        out = model(inp, t)
        t0 = time.perf_counter()
        x = sch.step(out, t, x).prev_sample
        sched += time.perf_counter() - t0
    return Run(x, steps, model.calls, sigma0, sigma_last, str(x.dtype).replace("torch.", ""), sched)


def run_one(con, shift, model, noise, steps):
    """(Run, None) or (None, why): float64 first, float32 where the class refuses float64."""
    why = None
    for dt in (torch.float64, torch.float32):
        sch, skip = build_scheduler(con, shift)
        if sch is None:
            return None, skip
        try:
            return flow_loop(sch, model, con, noise.to(dt), steps, shift), None
        except (TypeError, RuntimeError) as e:  # e.g. a fused step that takes float32 only
            why = f"error in the loop: {type(e).__name__}: {e}"
        except (ValueError, NotImplementedError, IndexError, KeyError) as e:
            return None, f"error in the loop: {type(e).__name__}: {e}"
    return None, why


def rms(d):
    return float(d.pow(2).mean().sqrt())


def score(run, ref):
    """The JSON record of one run: err, err_l2, err_start, floor (see the module docstring)."""
    x_ref = ref.main[0.0]
    x = run.x.to(torch.float64).reshape(x_ref.shape)
    rec = dict(steps=run.steps, calls=run.calls, sigma0=run.sigma0, sigma_last=run.sigma_last, dtype=run.dtype,
               sched_ms=1e3 * run.sched_s / max(run.calls, 1), err=math.inf, err_l2=math.inf, err_start=None,
               floor=None)
    y = ref.at(run.sigma_last)
    if y is not None:
        rec["floor"] = rms(y - run.sigma_last * ref.problem.velocity(y, run.sigma_last) - x_ref)
    if torch.isfinite(x).all():
        rec["err"], rec["err_l2"] = rms(x - x_ref), float((x - x_ref).norm(dim=1).mean())
        rec["err_start"] = rms(x - ref.from_start(run.sigma0))
    return rec


def needed_sigmas(contestants, calls):
    """Every sigma of some run's last model call (a dry pass of set_timesteps): the main reference
    is evaluated there (t_eval), for the one-jump floor. -> {shift: set of sigmas}."""
    out = {}
    for shift in SHIFTS:
        ends = out.setdefault(shift, set())
        for con in contestants:
            for c in calls:
                n, _ = steps_for_calls(con, shift, c)
                if n is None:
                    continue
                sch, _ = build_scheduler(con, shift)
                set_timesteps(sch, n, shift)
                ends.add(schedule_of(sch)[2])
    return out


def run_study(args, contestants, log):
    """-> ({problem: {"shift s": {label: {calls: record}}}}, reference stats, convergence checks)."""
    problems = {k: v for k, v in make_problems().items() if matches(k, args.problems)}
    ends = needed_sigmas(contestants, args.calls)
    out, stats, conv = {}, {}, {}
    for pname, pb in problems.items():
        check_velocity(pb, seed=args.seed)
        noise = torch.randn(args.batch, pb.dim, generator=torch.Generator().manual_seed(args.seed),
                            dtype=torch.float64)
        model = CountingModel(pb)
        for shift in args.shifts:
            t0 = time.perf_counter()
            ref = Reference(pb, noise, ends.get(shift, set()))
            t_ref = time.perf_counter() - t0
            cell = out.setdefault(pname, {}).setdefault(f"shift {shift:g}", {})
            for con in contestants:
                rows = cell.setdefault(con.label, {})
                for c in args.calls:
                    n, k = steps_for_calls(con, shift, c)
                    if n is None:
                        skip = k.startswith("from_config") or k.endswith("does not exist")
                        rows[str(c)] = {"skipped": k} if skip else {"n/a": k}
                        continue
                    run, why = run_one(con, shift, model, noise, n)
                    if run is None:
                        rows[str(c)] = {"skipped": why} if why.startswith("from_config") else {"error": why}
                        continue
                    assert run.calls == k, f"{con.label}: {run.calls} model calls counted, {k} timesteps"
                    rows[str(c)] = score(run, ref)
            conv.setdefault(pname, {})[f"shift {shift:g}"] = convergence(pb, shift, model, noise, ref)
            stats[f"{pname} / shift {shift:g}"] = {"solves": ref.solves, "seconds": round(ref.seconds, 2),
                                                    "x_ref_rms": rms(ref.main[0.0])}
            log(f"  {pname}, shift {shift:g}: {time.perf_counter() - t0:.1f} s (reference {t_ref:.1f} s, "
                f"{ref.solves} solves)")
    return out, stats, conv


def convergence(pb, shift, model, noise, ref):
    """Sanity: the CONVERGENCE runs (hundreds of steps) must end within CONVERGENCE_TOL * RMS(x_ref)
    of the reference, which checks the model's sigma convention against the reference ODE.
    -> {label: record with "tol" and "ok"}."""
    out, scale = {}, rms(ref.main[0.0])
    for lab, n in CONVERGENCE:
        con = next(c for c in PEER_CONTESTANTS if c.label == lab)
        run, why = run_one(con, shift, model, noise, n)
        if run is None:
            out[lab] = {"error": why, "ok": False}
            continue
        err = rms(run.x.to(torch.float64) - ref.main[0.0])
        out[lab] = {"steps": n, "calls": run.calls, "err": err, "tol": CONVERGENCE_TOL * scale,
                    "ok": bool(err < CONVERGENCE_TOL * scale)}
    return out


def sanity(conv):
    """The failed convergence checks, as lines (empty: fine)."""
    bad = []
    for pname, sd in conv.items():
        for skey, per in sd.items():
            for lab, r in per.items():
                if not r["ok"]:
                    bad.append(f"{pname} / {skey} / {lab}: " + (r.get("error") or
                               f"err {r['err']:.3g} at {r['calls']} calls, tolerance {r['tol']:.3g}"))
    return bad


# ------------------------------------------------------------------------------ tables
def matches(name, filters):
    """True if no filters, or one of them is a case-insensitive substring of name ("=name": exact)."""
    if not filters:
        return True
    return any(name == f[1:] if f.startswith("=") else f.lower() in name.lower() for f in filters)


KINDS = {}  # label -> kind, filled by metadata() / from the JSON


def kind_of(label):
    return KINDS.get(label, "fastint" if label.startswith("fastint") else "peer")


def calls_of(rows):
    return sorted({int(c) for d in rows.values() for c in d})


def value(rows, label, c, key="err"):
    v = rows.get(label, {}).get(str(c), {}).get(key)
    return None if v is None else float(v)


def fmt(v, kind="err"):
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "diverged"
    return f"{v:.2f}" if kind == "ratio" else f"{v:.2e}"


def best_peer(rows, c, key="err"):
    """(value, label) of the best peer in column c, or (None, None)."""
    cand = [(value(rows, lab, c, key), lab) for lab in rows if kind_of(lab) == "peer"]
    cand = [x for x in cand if x[0] is not None and math.isfinite(x[0])]
    return min(cand) if cand else (None, None)


def cell(rows, label, c, key="err", best=None):
    rec = rows.get(label, {}).get(str(c))
    if rec is None:
        return "—"
    for k in ("skipped", "error", "n/a"):
        if k in rec:
            return k
    v = rec.get(key)
    txt = fmt(v)
    if best is not None and v is not None and math.isfinite(v) and v <= best:
        txt = f"**{txt}**"
    if rec.get("calls", c) != c:
        txt += f" ({rec['calls']})"
    return txt


def md_table(head, body):
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)] + \
           ["| " + " | ".join(r) + " |" for r in body]


def md_problem(pname, skey, rows):
    """Endpoint error table of one (problem, shift), best non-baseline per column in bold, plus
    fastint / best-peer ratios; floors and err_start in a details block."""
    cs = calls_of(rows)
    contenders = [lab for lab in rows if kind_of(lab) != "baseline"]
    best = {}
    for c in cs:
        v = [value(rows, lab, c) for lab in contenders]
        v = [x for x in v if x is not None and math.isfinite(x)]
        best[c] = min(v) if v else None
    body = [[lab] + [cell(rows, lab, c, best=best[c] if kind_of(lab) != "baseline" else None) for c in cs]
            for lab in rows]
    for lab in rows:
        if kind_of(lab) == "fastint":
            rat = []
            for c in cs:
                v, (b, _) = value(rows, lab, c), best_peer(rows, c)
                rat.append(fmt(v / b, "ratio") if v is not None and b else "—")
            if any(r != "—" for r in rat):
                body.append([f"{lab} / best peer"] + rat)
    L = [f"#### {pname}, {skey}", ""] + md_table(["contestant"] + [f"{c}" for c in cs], body) + [""]
    bp = [best_peer(rows, c)[1] or "—" for c in cs]
    L += ["Best peer per column: " + ", ".join(f"{c}: {b}" for c, b in zip(cs, bp)) + ".", ""]
    det = [[lab] + [cell(rows, lab, c, "floor") for c in cs] for lab in rows]
    st = [[lab] + [cell(rows, lab, c, "err_start") for c in cs] for lab in rows
          if any((value(rows, lab, c, "sigma0") or 1.0) < 1.0 - 1e-9 for c in cs)]
    L += ["<details><summary>one-jump floor, and err against a reference from each scheduler's own first sigma"
          "</summary>", "", "*one-jump floor* (exact path to the last call's sigma, then x0 = x − σ v):", ""]
    L += md_table(["contestant"] + [f"{c}" for c in cs], det) + [""]
    if st:
        L += ["*err_start* (rows whose first sigma is below 1: reference from (σ₀, noise)):", ""]
        L += md_table(["contestant"] + [f"{c}" for c in cs], st) + [""]
    L += ["</details>", ""]
    return L


def md_convergence(res):
    """The sanity runs: err at hundreds of steps against the tolerance."""
    body = []
    for pname, sd in res.get("convergence", {}).items():
        for skey, per in sd.items():
            cells = ["error" if "error" in r else f"{fmt(r['err'])} ({r['calls']} calls)" +
                     ("" if r["ok"] else " **FAIL**") for r in per.values()]
            body.append([f"{pname}, {skey}"] + cells)
    if not body:
        return []
    labs = list(next(iter(next(iter(res["convergence"].values())).values())))
    return [f"### Sanity: convergence to the reference (tolerance {CONVERGENCE_TOL:g} × RMS of x_ref)", ""] + \
        md_table(["problem, shift"] + labs, body) + [""]


def md_schedules(res):
    """First and last-call sigma of each contestant (they differ, and explain the floors)."""
    body = []
    for skey, per in res.get("schedules", {}).items():
        for lab, d in per.items():
            body.append([f"{lab}, {skey}"] + [d.get(str(c), "—") for c in res["args"]["calls"]])
    if not body:
        return []
    return ["### Schedules: steps / calls / first σ / σ of the last call", ""] + \
        md_table(["contestant"] + [f"{c}" for c in res["args"]["calls"]], body) + [""]


def md_skips(errors):
    where = {}
    for pname, sd in errors.items():
        for skey, rows in sd.items():
            for lab, d in rows.items():
                for c, rec in d.items():
                    for k in ("skipped", "error"):
                        if k in rec:
                            where.setdefault((lab, k, rec[k]), set()).add(f"{pname}/{skey}")
                    if math.isinf(rec.get("err", 0.0)) and "calls" in rec:
                        where.setdefault((lab, "diverged", "non-finite output"), set()).add(f"{pname}/{skey}")
    return [f"- **{lab}** {k}: {why} ({', '.join(sorted(ctx))})" for (lab, k, why), ctx in sorted(where.items())]


def write_markdown(res, path):
    a = res["args"]
    L = ["## Flow-matching study: diffusers' rectified-flow schedulers vs fastint's (generated by "
         "bench/study_flow.py)", "",
         f"`{res['command']}`: {res['runtime_s']:.0f} s; batch {a['batch']}, seed {a['seed']}; torch "
         f"{res['versions']['torch']}, diffusers {res['versions']['diffusers']}, fastint {res['versions']['fastint']}. "
         "Method: the docstring of bench/study_flow.py. Endpoint error = RMS (over batch and coordinates) of "
         "x − x_ref against DOP853 on the exact flow ODE from the same noise at σ = 1; columns are model calls "
         "(a number in parentheses: the calls actually made, when fewer); best non-baseline per column in bold.", ""]
    if len(res.get("history", [])) > 1:
        L += ["Merged from these runs (`--merge`): " + "; ".join(f"`{h}`" for h in res["history"]) + ".", ""]
    L += md_convergence(res)
    skips = md_skips(res.get("errors", {}))
    if skips:
        L += ["### Skipped, failed or diverged", ""] + skips + [""]
    L += ["### Endpoint error (RMS) per problem", ""]
    for pname, sd in res.get("errors", {}).items():
        for skey, rows in sd.items():
            L += md_problem(pname, skey, rows)
    L += md_schedules(res)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ------------------------------------------------------------------------------ plot
def plot(res, path):
    """Error vs model calls, log-log, one panel per (problem, shift): peers dashed, baselines dotted,
    fastint solid."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    errors = res.get("errors", {})
    problems = list(errors)
    skeys = list(dict.fromkeys(s for sd in errors.values() for s in sd))
    if not problems or not skeys:
        return False
    fig, axes = plt.subplots(len(skeys), len(problems), figsize=(3.8 * len(problems), 3.1 * len(skeys) + 1.0),
                             squeeze=False)
    labels = list(dict.fromkeys(lab for sd in errors.values() for rows in sd.values() for lab in rows))
    cmap = plt.get_cmap("tab10")
    look = {lab: (cmap(i % 10), {"peer": "--", "baseline": ":", "fastint": "-"}[kind_of(lab)],
                  {"peer": "s", "baseline": "x", "fastint": "o"}[kind_of(lab)]) for i, lab in enumerate(labels)}
    for r, skey in enumerate(skeys):
        for c, pname in enumerate(problems):
            ax = axes[r][c]
            rows = errors[pname].get(skey, {})
            for lab, d in rows.items():
                pts = sorted({(rec["calls"], rec["err"]) for rec in d.values()
                              if "calls" in rec and math.isfinite(rec.get("err", math.inf))})
                if pts:
                    col, ls, mk = look[lab]
                    ax.plot(*zip(*pts), ls, color=col, marker=mk, ms=3.5, lw=1.2, label=lab)
            cs = calls_of(rows)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(cs)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.set_title(f"{pname}, {skey}", fontsize=8)
            ax.set_xlabel("model calls", fontsize=8)
            if c == 0:
                ax.set_ylabel("RMS endpoint error", fontsize=8)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=7)
    fig.tight_layout(rect=(0, 1.0 / (3.1 * len(skeys) + 1.0), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ main
def deep_merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min): 2-D and narrow problems, calls 5 10 "
                    "20, batch 128; writes to " + QUICK_DIR)
    ap.add_argument("--problems", nargs="+", help="substring filters on problem names (e.g. 2-D 64-D narrow)")
    ap.add_argument("--shifts", type=float, nargs="+", help=f"default {' '.join(f'{s:g}' for s in SHIFTS)}")
    ap.add_argument("--contestants", nargs="+", help="substring filters on labels ('=label' for an exact one); "
                    "keep the peers in for the ratio rows")
    ap.add_argument("--fastint", nargs=2, action="append", default=[], metavar=("LABEL", "JSON"),
                    help="an extra fastint row 'fastint FMC LABEL' with these from_config overrides (repeatable)")
    ap.add_argument("--peers-only", action="store_true", help="no fastint rows even where the class exists")
    ap.add_argument("--calls", type=int, nargs="+", help=f"model-call budgets (default {' '.join(map(str, CALLS))})")
    ap.add_argument("--batch", type=int, help="noises per problem (default 1000, --quick 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", help="where study_flow.{json,md} and flow_study.png go (default: bench/results and "
                    "docs for a full unfiltered run, else " + QUICK_DIR + ")")
    ap.add_argument("--commit", action="store_true", help="write to the committed places (bench/results, docs) "
                    "even for a quick or filtered run (use with --merge)")
    ap.add_argument("--merge", action="store_true", help="merge into the JSON already in the output place and "
                    "regenerate the markdown and the plot from the merged results")
    ap.add_argument("--render-only", action="store_true", help="measure nothing: regenerate the markdown and the "
                    "plot from the JSON in the output place")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    args.fastint = [(lab, json.loads(js)) for lab, js in args.fastint]
    args.filtered = any(getattr(args, k) for k in ("problems", "shifts", "contestants", "calls", "peers_only"))
    args.problems = args.problems or (["2-D", "narrow"] if q else None)
    args.shifts = args.shifts or list(SHIFTS)
    args.calls = sorted(args.calls or ([5, 10, 20] if q else list(CALLS)))
    args.batch = args.batch or (128 if q else 1000)
    return args


def output_paths(args):
    """(json, md, png): the committed places for a full run or --commit, else --out-dir or QUICK_DIR."""
    if args.commit or not (args.out_dir or args.quick or args.filtered):
        res = os.path.join(ROOT, "bench", "results")
        return (os.path.join(res, "study_flow.json"), os.path.join(res, "study_flow.md"),
                os.path.join(ROOT, "docs", "flow_study.png"))
    d = args.out_dir or QUICK_DIR
    return os.path.join(d, "study_flow.json"), os.path.join(d, "study_flow.md"), os.path.join(d, "flow_study.png")


def schedules(contestants, args):
    """{"shift s": {label: {calls: "n / k / sigma0 / sigma_last"}}}: what each contestant runs."""
    out = {}
    for shift in args.shifts:
        per = out.setdefault(f"shift {shift:g}", {})
        for con in contestants:
            d = per.setdefault(con.label, {})
            for c in args.calls:
                n, why = steps_for_calls(con, shift, c)
                if n is None:
                    d[str(c)] = "—"
                    continue
                sch, _ = build_scheduler(con, shift)
                set_timesteps(sch, n, shift)
                _, s0, sl = schedule_of(sch)
                d[str(c)] = f"{n} / {len(sch.timesteps)} / {s0:.6g} / {sl:.3g}"
    return out


def metadata(args, argv, runtime, contestants):
    import diffusers

    try:
        import fastint
        fastint_version = getattr(fastint, "__version__", "?")
    except ImportError:
        fastint_version = "not importable"
    command = "python bench/study_flow.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return {"command": command, "runtime_s": runtime, "history": [f"{command} ({runtime:.0f} s)"],
            "args": {k: v for k, v in vars(args).items()},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "fastint": fastint_version, "fastint_flow": fastint_status()},
            "contestants": [{"label": c.label, "cls": c.cls, "overrides": c.overrides, "kind": c.kind, "flow": c.flow,
                             "sigma_from": c.sigma_from} for c in contestants]}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    json_path, md_path, png_path = output_paths(args)
    if args.render_only:
        with open(json_path) as f:
            res = json.load(f)
    else:
        import diffusers  # noqa: F401  (fail early: the study needs it)
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()  # from_config's "passed ... will be ignored" (the base's shift, for UniPC/DPM)
        contestants = contestants_for(args)
        log(f"{len(contestants)} contestants: {', '.join(c.label for c in contestants)}; calls {args.calls}; "
            f"batch {args.batch}")
        t_start = time.perf_counter()
        errors, stats, conv = run_study(args, contestants, log)
        res = {"errors": errors, "reference": stats, "convergence": conv, "schedules": schedules(contestants, args)}
        meta = metadata(args, argv, time.perf_counter() - t_start, contestants)
        if args.merge and os.path.exists(json_path):
            with open(json_path) as f:
                old = json.load(f)
            meta["history"] = old.get("history", []) + meta["history"]
            known = {c["label"] for c in meta["contestants"]}
            meta["contestants"] = [c for c in old.get("contestants", []) if c["label"] not in known] + \
                meta["contestants"]
            res = deep_merge(old, res)
        res.update(meta)
        KINDS.update({c["label"]: c["kind"] for c in res["contestants"]})
        res["sanity"] = sanity(res["convergence"])
        for p in (json_path, md_path, png_path):
            os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    KINDS.update({c["label"]: c["kind"] for c in res["contestants"]})
    write_markdown(res, md_path)
    plotted = not args.no_plot and plot(res, png_path)
    log(f"wrote {'' if args.render_only else json_path + ', '}{md_path}" + (f", {png_path}" if plotted else "") +
        f" ({res['runtime_s']:.0f} s of measuring)")
    if res.get("sanity"):
        raise SystemExit("sanity check failed:\n  " + "\n  ".join(res["sanity"]))


if __name__ == "__main__":
    main()
