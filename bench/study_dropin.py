"""Drop-in study: diffusers schedulers used exactly as a user uses them, against fastint's.

    python bench/study_dropin.py              # full run (~15-25 min on 1 core): bench/results/study_dropin.{json,md},
                                              # docs/dropin_study.png
    python bench/study_dropin.py --quick      # smoke run (< 3 min): writes to /tmp/fastint_study_dropin
    python bench/study_dropin.py --contestants "fastint CMS" DPM --problems narrow --steps 10 20 --parts errors
                                              # a piece: filtered runs write to /tmp too (or --out-dir)
    python bench/study_dropin.py --contestants fastint --commit --merge
                                              # re-run the fastint rows only, merged into the committed results

Method
------
Every contestant is a (label, scheduler class, overrides) triple. Its scheduler is built the
way a user swaps schedulers, ``Cls.from_config(base_config, **mode_overrides, **overrides)``,
from one base config, and driven by the standard diffusers loop:

    sch.set_timesteps(n); x = init * sch.init_noise_sigma
    for t in sch.timesteps: x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample

``from_config`` silently drops keyword arguments a class does not know (diffusers only logs
them). A contestant whose overrides do not all show up in ``sch.config`` is therefore recorded
as *skipped* (with the reason), as is one whose ``from_config`` raises TypeError/ValueError:
no row is ever a silent re-run of the class defaults.

Base configs (prediction_type "epsilon", final_sigmas_type "zero", clip_sample False,
set_alpha_to_one True, steps_offset 0, so that every scheduler ends at sigma = 0, i.e. x0):
  ddpm-linear    1000 steps, betas linspace 1e-4..0.02 (DDPM)
  sd-scaled      1000 steps, "scaled_linear" 0.00085..0.012 (Stable Diffusion's schedule)
Spacing modes: "trailing" (identical timesteps for every class), "default" (each class's own
timestep_spacing: linspace for DPM/UniPC/DEIS/Euler, leading for DDIM and fastint), and each
of them with use_karras_sigmas=True for the classes that take it (DDIM does not; for fastint
it is attempted and skipped while the option does not exist).

Exact eps-models. The problems are Gaussian mixtures with diagonal covariances (the shipped
fastint.models.GaussianMixture is isotropic per component, which the power-law problem is
not), so E[eps | x_t] is known in closed form, computed in float64. The model is called with
the diffusers timestep as the scheduler passes it (int, or float for Euler and Karras sigma
schedules) and returns the exact eps at alpha_bar(timestep) = alphas_cumprod[k] for an
integer k; for a fractional timestep log-sigma is interpolated linearly between the integer
ones (the inverse of diffusers' ``_sigma_to_t``), sigma = sqrt((1 - alpha_bar)/alpha_bar).

Reference. In VE coordinates y = x/alpha the probability-flow ODE is dy/dsigma = eps(y, sigma),
with eps = sigma * sum_k r_k(y) (y - mu_k) / (v_k + sigma^2), regular down to sigma = 0 where
y = x0. For each run it is solved with scipy's DOP853 (rtol 1e-10, atol 1e-12, float64) from
the run's own start: sigma_0 = the scheduler's first sigma (``sch.sigmas[0]`` when it has
one, else the sigma of ``timesteps[0]``) and y(sigma_0) = init * init_noise_sigma expressed
in VE coordinates (VP schedulers, init_noise_sigma = 1: y = init * sqrt(1 + sigma_0^2); Euler
keeps the VE state itself). Solutions are cached per (problem, sigma_0, start scale): the VE
ODE does not depend on the beta schedule, so the config only enters through sigma_0.
The same N(0, I) draw is used for every scheduler (float64 where the scheduler runs in
float64; fastint's fused step takes float32 only, so its schedulers run in float32).

Metrics. ``err``: mean over the batch of |x_end - x0_ref|_2 with x0_ref the reference at
sigma = 0. Every scheduler here ends at sigma = 0 except DEIS (no final_sigmas_type) and the
two "final sigma_min" baselines, which end at sigma_min = sigma(alphas_cumprod[0]); their
``err`` includes what is left of the path from sigma_min to 0, and ``err_own`` (stored for
every run, shown in the DEIS footnote) is the error against the reference at the run's own
last sigma. ``floor`` ("one-jump floor"): the error of the exact solution down to the sigma
of the last model call followed by one exact x0 = E[x0 | x] step. DPM-Solver++ (with
final_sigmas_type "zero"), UniPC (lower_order_final), DDIM, Euler and fastint's x0 row all
take a first-order last step (DEIS only below 15 steps), so with trailing or linspace spacing
(last timestep about 1000/n) this jump dominates their error from about 15 steps on.
UniPC bh1 to sigma = 0 gives NaN in diffusers 0.42.1 (its B_h = h is infinite there); it is
shown as diverged, and "UniPC bh1, final sigma_min" is what bh1 does otherwise.
``ratio``: a fastint contestant's err over the best (smallest) finite err of the peers
DPM-Solver++ 2M/3M, UniPC bh1/bh2 and DEIS in the same problem, config, mode and step count
(baselines are not peers).
``sched_ms``: wall time of the scheduler's own calls (set_timesteps, scale_model_input, step)
per step, model time excluded.

Learned model. The shipped VP digits model (fastint.models.load_checkpoint("vp"), an
eps-model in continuous t of VPSDE(0.1, 20)) is wrapped for diffusers: trained_betas with
alphas_cumprod[k] = alpha((k+1)/1000)^2, and the timestep k maps to t = (k+1)/1000 (integer
k) or to the t with the same alpha_bar (fractional k, via the log-sigma interpolation above
and VPSDE.inv_int_beta). 500 digits per (contestant, steps, mode) from one fixed seed,
scored by fastint.metrics.frechet_distance against all 1797 digits (classifier features).
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
QUICK_DIR = "/tmp/fastint_study_dropin"

STEPS = (5, 6, 8, 10, 15, 20, 50)
FD_STEPS = (5, 10, 20)
MODES = {  # mode -> (overrides, needs use_karras_sigmas)
    "trailing": ({"timestep_spacing": "trailing"}, False),
    "trailing+karras": ({"timestep_spacing": "trailing", "use_karras_sigmas": True}, True),
    "default": ({}, False),
    "default+karras": ({"use_karras_sigmas": True}, True),
}
COMMON = dict(num_train_timesteps=1000, prediction_type="epsilon", final_sigmas_type="zero", clip_sample=False,
              set_alpha_to_one=True, steps_offset=0)
CONFIGS = {
    "ddpm-linear": dict(COMMON, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "sd-scaled": dict(COMMON, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}


# ------------------------------------------------------------------------------ contestants
@dataclass(frozen=True)
class Contestant:
    """One scheduler as a user would configure it: ``module.cls.from_config(base, **overrides)``."""

    label: str
    cls: str  # "diffusers.X" or "fastint.diffusers.X"
    overrides: dict = field(default_factory=dict)
    karras: bool = True  # whether the class takes use_karras_sigmas (attempted in the karras modes)
    kind: str = "peer"  # "peer" (in the best-of-peers), "baseline" or "fastint"

    def resolve(self):
        import importlib

        module, _, name = self.cls.rpartition(".")
        return getattr(importlib.import_module(module), name)


CMS = "fastint.diffusers.ConjugateMultistepScheduler"
CONTESTANTS = [
    Contestant("DPM-Solver++ 2M", "diffusers.DPMSolverMultistepScheduler",
               {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    Contestant("DPM-Solver++ 3M", "diffusers.DPMSolverMultistepScheduler",
               {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    Contestant("UniPC bh1", "diffusers.UniPCMultistepScheduler", {"solver_type": "bh1"}),
    Contestant("UniPC bh2", "diffusers.UniPCMultistepScheduler", {"solver_type": "bh2"}),
    # bh1 ending at sigma = 0 gives NaN in diffusers 0.42.1 (B_h = h = -inf times a zero residual):
    # this row shows what bh1 does when it stops at sigma_min instead.
    Contestant("UniPC bh1, final sigma_min", "diffusers.UniPCMultistepScheduler",
               {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, kind="baseline"),
    Contestant("DEIS", "diffusers.DEISMultistepScheduler"),
    # DPM-Solver++ 2M stopping at sigma_min like DEIS: separates the final jump to sigma = 0 from the rest
    Contestant("DPM-Solver++ 2M, final sigma_min", "diffusers.DPMSolverMultistepScheduler",
               {"solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "sigma_min"},
               kind="baseline"),
    Contestant("DDIM", "diffusers.DDIMScheduler", karras=False, kind="baseline"),
    Contestant("Euler", "diffusers.EulerDiscreteScheduler", kind="baseline"),
    Contestant("fastint CMS", CMS, kind="fastint"),  # the class defaults, whatever they are
    Contestant("fastint CMS k=1", CMS, {"solver_order": 1}, kind="fastint"),
    Contestant("fastint CMS k=2", CMS, {"solver_order": 2}, kind="fastint"),
    Contestant("fastint CMS x0 final", CMS, {"final_step": "x0", "lower_final": True}, kind="fastint"),
    Contestant("fastint CMS k=3", CMS, {"solver_order": 3}, kind="fastint"),
    Contestant("fastint CMS k=1+C", CMS, {"solver_order": 1, "corrector": True}, kind="fastint"),
    Contestant("fastint CMS k=2+C", CMS, {"solver_order": 2, "corrector": True}, kind="fastint"),
    Contestant("fastint CMS k=2+C logsnr", CMS, {"solver_order": 2, "corrector": True, "interp": "logsnr"},
               kind="fastint"),
    Contestant("fastint CMS k=3 logsnr", CMS, {"solver_order": 3, "interp": "logsnr"}, kind="fastint"),
    Contestant("fastint λ-DDIM", "fastint.diffusers.LambdaDDIMScheduler", kind="fastint"),
    # final_step="multistep": the last interval integrated like the others (no jump to x0)
    Contestant("fastint CMS k=2 MF", CMS, {"solver_order": 2, "final_step": "multistep"}, kind="fastint"),
    Contestant("fastint CMS k=3 MF", CMS, {"solver_order": 3, "final_step": "multistep"}, kind="fastint"),
    Contestant("fastint CMS k=2 logsnr MF", CMS, {"solver_order": 2, "interp": "logsnr", "final_step": "multistep"},
               kind="fastint"),
    Contestant("fastint CMS k=3 logsnr MF", CMS, {"solver_order": 3, "interp": "logsnr", "final_step": "multistep"},
               kind="fastint"),
    Contestant("fastint CMS k=2+C MF", CMS, {"solver_order": 2, "corrector": True, "final_step": "multistep"},
               kind="fastint"),
    Contestant("fastint CMS k=2+C logsnr MF", CMS,
               {"solver_order": 2, "corrector": True, "interp": "logsnr", "final_step": "multistep"}, kind="fastint"),
    # ... and without lower_order_final (the last steps keep their order)
    Contestant("fastint CMS k=2 MF full", CMS, {"solver_order": 2, "final_step": "multistep",
                                               "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=3 MF full", CMS, {"solver_order": 3, "final_step": "multistep",
                                               "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2 logsnr MF full", CMS, {"solver_order": 2, "interp": "logsnr", "final_step": "multistep",
                                                      "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=3 logsnr MF full", CMS, {"solver_order": 3, "interp": "logsnr", "final_step": "multistep",
                                                      "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C MF full", CMS, {"solver_order": 2, "corrector": True, "final_step": "multistep",
                                                 "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C logsnr MF full", CMS,
               {"solver_order": 2, "corrector": True, "interp": "logsnr", "final_step": "multistep",
                "lower_final": False}, kind="fastint"),
    # interpolation in sigma (DEIS's rhoAB): smooth down to sigma = 0
    Contestant("fastint CMS k=2 sigma", CMS, {"solver_order": 2, "interp": "sigma"}, kind="fastint"),
    Contestant("fastint CMS k=3 sigma", CMS, {"solver_order": 3, "interp": "sigma"}, kind="fastint"),
    Contestant("fastint CMS k=2 sigma MF full", CMS, {"solver_order": 2, "interp": "sigma", "final_step": "multistep",
                                                     "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=3 sigma MF full", CMS, {"solver_order": 3, "interp": "sigma", "final_step": "multistep",
                                                     "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C sigma MF full", CMS,
               {"solver_order": 2, "corrector": True, "interp": "sigma", "final_step": "multistep",
                "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C sigma", CMS, {"solver_order": 2, "corrector": True, "interp": "sigma"},
               kind="fastint"),
    # ending at sigma_min, as DEIS always does (final_sigmas_type='sigma_min')
    Contestant("fastint CMS k=3 SM", CMS, {"solver_order": 3, "final_sigmas_type": "sigma_min",
                                          "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C SM", CMS, {"solver_order": 2, "corrector": True, "final_sigmas_type": "sigma_min",
                                            "lower_final": False}, kind="fastint"),
    Contestant("fastint CMS k=2+C logsnr SM", CMS, {"solver_order": 2, "corrector": True, "interp": "logsnr",
                                                   "final_sigmas_type": "sigma_min", "lower_final": False},
               kind="fastint"),
    Contestant("fastint CMS k=3 logsnr SM", CMS, {"solver_order": 3, "interp": "logsnr",
                                                 "final_sigmas_type": "sigma_min", "lower_final": False},
               kind="fastint"),
    Contestant("fastint CMS k=2 logsnr SM", CMS, {"solver_order": 2, "interp": "logsnr",
                                                 "final_sigmas_type": "sigma_min", "lower_final": False},
               kind="fastint"),
    # DEIS's own configuration in fastint's terms (logrho = interpolation in log sigma, lower_order_final)
    Contestant("fastint CMS as DEIS", CMS, {"solver_order": 2, "interp": "logsnr", "final_sigmas_type": "sigma_min",
                                           "lower_final": True}, kind="fastint"),
    # predict='x0': the data predictions interpolated (DPM-Solver++'s frame)
    Contestant("fastint CMS x0", CMS, {"predict": "x0"}, kind="fastint"),
    Contestant("fastint CMS x0 k=3", CMS, {"predict": "x0", "solver_order": 3}, kind="fastint"),
    Contestant("fastint CMS x0+C", CMS, {"predict": "x0", "corrector": True}, kind="fastint"),
    Contestant("fastint CMS x0 logsnr", CMS, {"predict": "x0", "interp": "logsnr"}, kind="fastint"),
    Contestant("fastint CMS x0 logsnr+C", CMS, {"predict": "x0", "interp": "logsnr", "corrector": True},
               kind="fastint"),
    Contestant("fastint CMS x0 x0-final", CMS, {"predict": "x0", "final_step": "x0"}, kind="fastint"),
    Contestant("fastint CMS x0 logsnr x0-final", CMS, {"predict": "x0", "interp": "logsnr", "final_step": "x0"},
               kind="fastint"),
    Contestant("fastint CMS x0 logsnr+C x0-final", CMS, {"predict": "x0", "interp": "logsnr", "corrector": True,
                                                        "final_step": "x0"}, kind="fastint"),
    Contestant("DPM-Solver++ 3M, final sigma_min", "diffusers.DPMSolverMultistepScheduler",
               {"solver_order": 3, "algorithm_type": "dpmsolver++", "final_sigmas_type": "sigma_min"},
               kind="baseline"),
]
PEERS = [c.label for c in CONTESTANTS if c.kind == "peer"]  # the best-of set of the ratio tables


def build_scheduler(con, base_config, mode):
    """(scheduler, None) or (None, reason it is skipped) for contestant ``con`` in ``mode``."""
    mode_over, needs_karras = MODES[mode]
    if needs_karras and not con.karras:
        return None, "n/a"  # class has no Karras sigmas: not a run, not a skip
    overrides = {**mode_over, **con.overrides}
    try:
        sch = con.resolve().from_config(base_config, **overrides)
    except (TypeError, ValueError, NotImplementedError) as e:
        return None, f"from_config raised {type(e).__name__}: {e}"
    ignored = [k for k, v in overrides.items() if k not in sch.config or sch.config[k] != v]
    if ignored:
        return None, f"from_config ignored {', '.join(f'{k}={overrides[k]!r}' for k in ignored)} (not an option)"
    return sch, None


# ------------------------------------------------------------------------------ timesteps
class TimestepMap:
    """diffusers timestep (int or fractional) -> sigma = sqrt((1 - abar)/abar), of one config.

    Integer k: abar = alphas_cumprod[k] (diffusers' float32 values, used in float64).
    Fractional k: log-sigma interpolated linearly between the integers (inverse of ``_sigma_to_t``).
    """

    def __init__(self, alphas_cumprod):
        ac = alphas_cumprod.to(torch.float64).numpy()
        self.sigmas = np.sqrt((1 - ac) / ac)
        self.log_sigmas = np.log(self.sigmas)
        self.n = len(ac)

    @classmethod
    def of_config(cls, config):
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_config(config).alphas_cumprod)

    def sigma(self, t):
        k = min(max(float(t), 0.0), self.n - 1.0)
        if k == round(k):
            return float(self.sigmas[int(round(k))])
        return float(np.exp(np.interp(k, np.arange(self.n), self.log_sigmas)))


# ------------------------------------------------------------------------------ problems
@dataclass
class Mixture:
    """Gaussian mixture with diagonal covariances, exact in float64: means/variances [K, d], weights [K]."""

    name: str
    means: torch.Tensor
    variances: torch.Tensor
    log_weights: torch.Tensor

    @property
    def dim(self):
        return self.means.shape[1]

    def eps(self, y, sigma):
        """E[eps | y] for y = x0 + sigma * eps (VE), y [B, d] float64 -> [B, d] float64."""
        var = self.variances + sigma * sigma  # [K, d]
        diff = y[:, None, :] - self.means[None]  # [B, K, d]
        logp = self.log_weights - 0.5 * (diff * diff / var + var.log()).sum(-1)  # [B, K] (+ const)
        resp = torch.softmax(logp, dim=1)
        return sigma * torch.einsum("bk,bkd->bd", resp, diff / var)


def _mixture(name, means, stds, weights):
    means = torch.as_tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64)
    if stds.ndim == 1:  # isotropic per component
        stds = stds[:, None].expand_as(means)
    w = torch.as_tensor(weights, dtype=torch.float64)
    return Mixture(name, means, stds.clone() ** 2, torch.log(w / w.sum()))


def make_problems():
    """name -> Mixture: the four analytic problems (deterministic)."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    pbs = [
        _mixture("3-D, 6 modes", n(6, 3) * 0.8, 0.1 + 0.2 * r(6), 0.5 + r(6)),
        _mixture("32-D, 8 modes", n(8, 32) * (1.5 / math.sqrt(32)), 0.1 + 0.2 * r(8), 0.5 + r(8)),
        _mixture("4-D, narrow mode (std 0.02)", n(4, 4) * 0.8, torch.tensor([0.02, 0.2, 0.25, 0.3]), 0.5 + r(4)),
        _mixture("64-D Gaussian, variances k^-2", torch.zeros(1, 64),
                 1.0 / torch.arange(1, 65, dtype=torch.float64)[None], [1.0]),
    ]
    return {p.name: p for p in pbs}


class ExactEps:
    """The exact eps-model of ``problem`` in diffusers' convention: model(x_t, timestep) -> eps."""

    def __init__(self, problem, tmap):
        self.problem, self.tmap = problem, tmap

    def __call__(self, x, t):
        s = self.tmap.sigma(t)
        y = x.to(torch.float64) * math.sqrt(1.0 + s * s)  # VP state -> VE
        return self.problem.eps(y, s).to(x.dtype)


# ------------------------------------------------------------------------------ reference
class ReferenceCache:
    """DOP853 solutions of dy/dsigma = eps(y, sigma) for one problem and one initial draw.

    ``get(sigma0, scale)`` solves from y(sigma0) = scale * init once per (sigma0, scale) and
    returns y at every sigma of ``end_sigmas`` below sigma0 (always including 0, where y = x0).
    """

    def __init__(self, problem, init, end_sigmas, rtol=1e-10, atol=1e-12):
        self.problem = problem
        self.init = init.to(torch.float64)
        self.ends = sorted({0.0, *end_sigmas}, reverse=True)
        self.rtol, self.atol = rtol, atol
        self._cache = {}
        self.solves, self.seconds = 0, 0.0

    def get(self, sigma0, scale):
        key = (f"{sigma0:.6g}", f"{scale:.6g}")
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = self._solve(sigma0, scale * self.init)
            self.solves += 1
            self.seconds += time.perf_counter() - t0
        return self._cache[key]

    def _solve(self, sigma0, y0):
        from scipy.integrate import solve_ivp

        shape, eps = y0.shape, self.problem.eps

        def rhs(s, y):
            return eps(torch.from_numpy(y).view(shape), s).numpy().ravel()

        ends = [e for e in self.ends if e < sigma0]
        sol = solve_ivp(rhs, (sigma0, 0.0), y0.numpy().ravel(), method="DOP853", rtol=self.rtol, atol=self.atol,
                        t_eval=ends)
        if not sol.success:
            raise RuntimeError(f"reference solve failed ({self.problem.name}, sigma0={sigma0}): {sol.message}")
        return {e: torch.from_numpy(np.ascontiguousarray(sol.y[:, i])).view(shape) for i, e in enumerate(ends)}


# ------------------------------------------------------------------------------ running
@dataclass
class Run:
    """What one scheduler loop produced: the final state and what is needed to score it."""

    x: torch.Tensor
    sigma0: float  # the sigma at which the scheduler reads its initial state
    sigma_last: float  # the sigma of the state at the last model call
    sigma_end: float  # the sigma of its output
    ve_state: bool  # True if the state is y = x/alpha (Euler), False for the VP state x
    init_scale: float  # y(sigma0) = init_scale * init
    nfe: int
    dtype: str
    sched_s: float  # wall time inside the scheduler's own calls


def schedule_sigmas(sch, tmap):
    """(first, last model call, end) sigma of a scheduler after set_timesteps."""
    sig = getattr(sch, "sigmas", None)
    if isinstance(sig, torch.Tensor) and sig.numel() == len(sch.timesteps) + 1:
        return float(sig[0]), float(sig[-2]), float(sig[-1])
    # no sigmas (DDIM, fastint): sigma = 0 unless told to stop at alphas_cumprod[0]
    c = sch.config
    at_min = c.get("final_sigmas_type") == "sigma_min" or c.get("set_alpha_to_one") is False
    return tmap.sigma(sch.timesteps[0]), tmap.sigma(sch.timesteps[-1]), tmap.sigma(0) if at_min else 0.0


def needed_sigmas(contestants, configs, tmaps, modes, steps):
    """Every sigma where some run needs the reference state (last model call, end), from a dry
    pass of set_timesteps over all runs: the reference solves evaluate there (t_eval)."""
    out = {0.0}
    for cname, cfg in configs.items():
        for mode in modes:
            for con in contestants:
                for n in steps:
                    sch, _ = build_scheduler(con, cfg, mode)
                    if sch is None:
                        break
                    try:
                        sch.set_timesteps(n)
                    except (TypeError, ValueError, NotImplementedError):
                        continue
                    out.update(schedule_sigmas(sch, tmaps[cname])[1:])
    return out


def diffusers_loop(sch, model, init, steps, tmap):
    """The standard diffusers sampling loop; scheduler time is measured apart from model time.
    ``steps``: the number of steps, or the timesteps themselves (``set_timesteps(timesteps=...)``)."""
    t0 = time.perf_counter()
    if isinstance(steps, int):
        sch.set_timesteps(steps)
    else:
        sch.set_timesteps(timesteps=steps)
    x = init * sch.init_noise_sigma
    sched = time.perf_counter() - t0
    for t in sch.timesteps:
        t0 = time.perf_counter()
        inp = sch.scale_model_input(x, t)
        sched += time.perf_counter() - t0
        out = model(inp, t)
        t0 = time.perf_counter()
        x = sch.step(out, t, x).prev_sample
        sched += time.perf_counter() - t0
    sigma0, sigma_last, sigma_end = schedule_sigmas(sch, tmap)
    ins = float(sch.init_noise_sigma)
    ve = abs(ins - 1.0) > 1e-12  # VP schedulers start from init itself; Euler from init * sigma_max
    scale = ins if ve else math.sqrt(1.0 + sigma0 * sigma0)
    return Run(x, sigma0, sigma_last, sigma_end, ve, scale, len(sch.timesteps), str(x.dtype).replace("torch.", ""), sched)


class Runner:
    """Builds and runs contestants: float64 first, float32 where a class refuses float64."""

    def __init__(self, force_dtype=None):
        self.force = force_dtype
        self.float32_only = set()

    def run(self, con, config, mode, model, init, steps, tmap):
        """(Run, None), or (None, why): "n/a", a skip ("from_config ...") or a loop error."""
        if self.force is not None:
            dtypes = [self.force]
        else:
            dtypes = [torch.float32] if con.label in self.float32_only else [torch.float64, torch.float32]
        why = None
        for dt in dtypes:
            sch, skip = build_scheduler(con, config, mode)
            if sch is None:
                return None, skip
            try:
                return diffusers_loop(sch, model, init.to(dt), steps, tmap), None
            except (TypeError, RuntimeError) as e:  # e.g. fastint's fused step: float32/16/bf16 only
                why = f"error in the loop: {type(e).__name__}: {e}"
                if dt == torch.float64:
                    self.float32_only.add(con.label)
            except (ValueError, NotImplementedError, IndexError, KeyError) as e:
                return None, f"error in the loop: {type(e).__name__}: {e}"
        return None, why


def ref_at(ref, sigma):
    """The reference VE state at ``sigma`` (a t_eval point), or None."""
    for s, y in ref.items():
        if s == sigma or abs(s - sigma) <= 1e-6 * s:
            return y
    return None


def score_run(run, ref, problem):
    """Scores of one run against its reference (see the module docstring):
    err (vs x0), err_own (vs the reference at the run's own end sigma) and floor (exact ODE down
    to the last model call's sigma, then one exact x0 = E[x0 | x] step)."""
    x0 = ref[0.0]
    x = run.x.to(torch.float64).reshape(x0.shape)
    out = {"err": math.inf, "err_own": None, "floor": None}
    y_last = ref_at(ref, run.sigma_last)
    if y_last is not None:
        s = run.sigma_last
        out["floor"] = float((y_last - s * problem.eps(y_last, s) - x0).norm(dim=1).mean())
    if not torch.isfinite(x).all():
        return out
    out["err"] = float((x - x0).norm(dim=1).mean())
    y_end = ref_at(ref, run.sigma_end)
    if y_end is not None:
        target = y_end if run.ve_state else y_end / math.sqrt(1.0 + run.sigma_end ** 2)
        out["err_own"] = float((x - target).norm(dim=1).mean())
    return out


def error_record(run, why, refs):
    """The JSON record of one (contestant, steps) cell."""
    if run is None:
        return {"skipped": why} if why.startswith("from_config") else {"error": why}
    rec = score_run(run, refs.get(run.sigma0, run.init_scale), refs.problem)
    rec.update(sigma0=run.sigma0, sigma_last=run.sigma_last, sigma_end=run.sigma_end, nfe=run.nfe, dtype=run.dtype,
               sched_ms=1e3 * run.sched_s / run.nfe)
    return rec


def sweep(contestants, modes, steps, do_run, store):
    """Run every (mode, contestant, steps) with do_run(con, mode, n) -> (Run|None, why) and
    store(mode, label, n, run, why); a class without Karras sigmas gets no karras rows, and a
    skip is built once and recorded for every step count, since its reason does not depend on it."""
    for mode in modes:
        for con in contestants:
            for n in steps:
                run, why = do_run(con, mode, n)
                if why == "n/a":
                    break
                if run is None and why.startswith("from_config"):
                    for m in steps:
                        store(mode, con.label, m, None, why)
                    break
                store(mode, con.label, n, run, why)


# ------------------------------------------------------------------------------ part 1: exact models
def run_errors(args, contestants, log):
    """Endpoint errors -> ({config: {problem: {mode: {label: {steps: record}}}}}, reference stats)."""
    problems = {k: v for k, v in make_problems().items() if matches(k, args.problems)}
    configs = {k: v for k, v in CONFIGS.items() if matches(k, args.configs)}
    tmaps = {c: TimestepMap.of_config(cfg) for c, cfg in configs.items()}
    ends = needed_sigmas(contestants, configs, tmaps, args.modes, args.steps)
    runner = Runner(args.force_dtype)
    out, stats = {}, {}
    for pname, pb in problems.items():
        init = torch.randn(args.batch, pb.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
        refs = ReferenceCache(pb, init, ends)
        for cname, cfg in configs.items():
            t0 = time.perf_counter()
            model, tmap = ExactEps(pb, tmaps[cname]), tmaps[cname]
            cell = out.setdefault(cname, {}).setdefault(pname, {})

            def store(mode, label, n, run, why):
                cell.setdefault(mode, {}).setdefault(label, {})[str(n)] = error_record(run, why, refs)

            sweep(contestants, args.modes, args.steps,
                  lambda con, mode, n: runner.run(con, cfg, mode, model, init, n, tmap), store)
            log(f"  {pname} / {cname}: {time.perf_counter() - t0:.1f} s "
                f"(reference solves {refs.solves}, {refs.seconds:.1f} s in all)")
        stats[pname] = {"solves": refs.solves, "seconds": round(refs.seconds, 2)}
    return out, stats


# ------------------------------------------------------------------------------ part 2: learned model
def digits_config(sde, n=1000):
    """Base config whose alphas_cumprod[k] is the VP sde's alpha((k+1)/n)^2."""
    abar = sde.alpha(torch.arange(1, n + 1, dtype=torch.float64) / n) ** 2
    betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return dict(COMMON, num_train_timesteps=n, beta_schedule="linear", trained_betas=betas.tolist())


class LearnedEps:
    """A continuous-time VP eps-model net(z, t) called with diffusers timesteps k (int or fractional)."""

    def __init__(self, net, sde, tmap):
        self.net, self.sde, self.tmap = net, sde, tmap

    def continuous_t(self, k):
        k = float(k)
        if k == round(k):
            return (k + 1) / self.tmap.n
        s = self.tmap.sigma(k)  # same alpha_bar = 1/(1 + s^2): B(t) = log(1 + s^2)
        return float(self.sde.inv_int_beta(torch.tensor(math.log1p(s * s), dtype=torch.float64)))

    @torch.no_grad()
    def __call__(self, x, t):
        tc = torch.full((x.shape[0],), self.continuous_t(t), dtype=torch.float32)
        return self.net(x.float(), tc).to(x.dtype)


def learned_vp(checkpoint="vp"):
    """A VP digits denoiser in diffusers' terms -> (loaded checkpoint, config, timestep map, ε-model
    called with integer timesteps). ``checkpoint``: 'vp' (shipped) or a path."""
    from fastint.models import load_checkpoint

    loaded = load_checkpoint(checkpoint, process="vp")
    cfg = digits_config(loaded.sde)
    tmap = TimestepMap.of_config(cfg)
    return loaded, cfg, tmap, LearnedEps(loaded.model.eval(), loaded.sde, tmap)


def write_results(stem, md, data):
    """The committed results of a study: bench/results/<stem>.md (``md``) and .json (``data``)."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", stem)
    with open(out + ".md", "w") as f:
        f.write(md + "\n")
    with open(out + ".json", "w") as f:
        json.dump(data, f, indent=1)


def run_fd(args, contestants, log):
    """Fréchet distances on the shipped VP digits model -> {mode: {label: {steps: record}}}, floors."""
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    _, cfg, tmap, model = learned_vp("vp")
    real = load_digits("all")[0]
    g = torch.Generator().manual_seed(args.seed)
    init = torch.randn(args.fd_batch, 1, 8, 8, generator=g)
    runner = Runner(torch.float32)  # the network is float32

    def fd(x):
        return frechet_distance(x.float(), real) if torch.isfinite(x).all() else math.inf

    out = {}
    t0 = time.perf_counter()

    def store(mode, label, n, run, why):
        rec = ({"skipped": why} if why.startswith("from_config") else {"error": why}) if run is None else \
            {"fd": fd(run.x), "nfe": run.nfe, "sched_ms": 1e3 * run.sched_s / run.nfe}
        out.setdefault(mode, {}).setdefault(label, {})[str(n)] = rec

    sweep(contestants, args.modes, args.fd_steps,
          lambda con, mode, n: runner.run(con, cfg, mode, model, init, n, tmap), store)
    sub = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed + 1))[:args.fd_batch]]
    floors = {f"{args.fd_batch} real digits": frechet_distance(sub, real)}
    if args.fd_converged:
        con = next(c for c in CONTESTANTS if c.label == "DPM-Solver++ 2M")
        run, _ = runner.run(con, cfg, "trailing", model, init, args.fd_converged, tmap)
        floors[f"DPM-Solver++ 2M, {args.fd_converged} steps, trailing"] = fd(run.x)
    log(f"  digits FD: {time.perf_counter() - t0:.1f} s")
    return out, floors


# ------------------------------------------------------------------------------ tables
SHORT = {"DPM-Solver++ 2M": "2M", "DPM-Solver++ 3M": "3M", "UniPC bh1": "bh1", "UniPC bh2": "bh2", "DEIS": "DEIS"}


def matches(name, filters):
    """True if no filters, or one of them is a case-insensitive substring of name ("=name": exact)."""
    if not filters:
        return True
    return any(name == f[1:] if f.startswith("=") else f.lower() in name.lower() for f in filters)


def steps_of(rows):
    return sorted({int(n) for d in rows.values() for n in d})


def value(rows, label, n, key="err"):
    """The metric of one cell, or None where missing, skipped or errored."""
    rec = rows.get(label, {}).get(str(n), {})
    v = rec.get(key)
    return None if v is None else float(v)


def fmt(v, kind="err"):
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "diverged"
    if kind == "ratio":
        return f"{v:.2f}"
    if kind == "fd":
        return f"{v:.3f}" if v < 100 else f"{v:.0f}"
    return f"{v:.2e}"


def cell_text(rows, label, n, key, kind):
    rec = rows.get(label, {}).get(str(n))
    if rec is None:
        return "—"
    if "skipped" in rec:
        return "skipped"
    if "error" in rec:
        return "error"
    return fmt(rec.get(key), kind)


def best_peer(rows, n, key="err"):
    """(value, label) of the best peer at step count n, or (None, None)."""
    cand = [(value(rows, p, n, key), p) for p in PEERS]
    cand = [c for c in cand if c[0] is not None and math.isfinite(c[0])]
    return min(cand) if cand else (None, None)


def ratio(rows, label, n, key="err"):
    v, (b, _) = value(rows, label, n, key), best_peer(rows, n, key)
    return None if v is None or b is None or b == 0 else v / b


def gmean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def md_table(head, rows):
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def labels_in(*tables):
    seen = {lab for t in tables for lab in t}
    return [c.label for c in CONTESTANTS if c.label in seen]


def fastint_labels(rows):
    return [c.label for c in CONTESTANTS if c.kind == "fastint" and c.label in rows]


def skipped_lines(res):
    """One line per (contestant, what happened, reason): where it was skipped, failed or diverged."""
    where = {}

    def visit(rows, ctx, key):
        for label, d in rows.items():
            for n, rec in d.items():
                if "skipped" in rec or "error" in rec:
                    kind = "skipped" if "skipped" in rec else "failed"
                    where.setdefault((label, kind, rec.get("skipped") or rec.get("error")), set()).add(ctx)
                elif rec.get(key) is not None and not math.isfinite(rec[key]):
                    where.setdefault((label, "diverged", "non-finite output"), set()).add(f"{ctx}/{n}")

    for cname, pd in res.get("errors", {}).items():
        for pname, md in pd.items():
            for mode, rows in md.items():
                visit(rows, f"{cname}/{mode}", "err")
    for mode, rows in res.get("fd", {}).items():
        visit(rows, f"digits/{mode}", "fd")
    lines = []
    for (label, kind, why), ctx in sorted(where.items()):
        ctx = sorted(ctx)
        if kind == "diverged":  # list the (config/mode) pairs, not every step count
            ctx = sorted({c.rsplit("/", 1)[0] for c in ctx})
        lines.append(f"- **{label}** {kind}: {why} ({', '.join(ctx)})")
    return lines


def md_headline(errors):
    """Geometric mean over problems of fastint / best peer, per config and mode."""
    L = ["### fastint against the best peer (geometric mean over the problems of err / best-peer err)", "",
         "Best peer = the smallest endpoint error among " + ", ".join(PEERS) + " in the same problem, config, "
         "spacing mode and step count; < 1: fastint is more accurate. Every scheduler here except DEIS at >= 15 "
         "steps (which also stops at sigma_min) ends with a first-order x0 step from the last timestep to "
         "sigma = 0, so from ~15 steps on in trailing/linspace spacing the error is mostly that last jump (the "
         "*one-jump floor* rows of the detail tables), and leading spacing (DDIM's and fastint's default), whose "
         "last timestep is 0, has a much shorter one.", ""]
    for cname, pd in errors.items():
        for mode in MODES:
            tabs = [md[mode] for md in pd.values() if mode in md]
            labs = labels_in(*[{lab: 1 for lab in fastint_labels(t)} for t in tabs])
            if not labs:
                continue
            steps = sorted({n for t in tabs for n in steps_of(t)})
            body, skipped = [], []
            for lab in labs:
                recs = [r for t in tabs for r in t.get(lab, {}).values()]
                if recs and all("skipped" in r for r in recs):
                    skipped.append(lab)
                else:
                    body.append([lab] + [fmt(gmean([ratio(t, lab, n) for t in tabs]), "ratio") for n in steps])
            L += [f"**{cname}, {mode}:**" + (f" skipped: {', '.join(skipped)}." if skipped else ""), ""]
            if body:
                L += md_table(["contestant"] + [f"{n} steps" for n in steps], body) + [""]
    return L


def md_best_peer(errors):
    """Which peer is best, per config / mode / problem and step count."""
    body, steps = [], set()
    for cname, pd in errors.items():
        for mode in MODES:
            for pname, md in pd.items():
                if mode in md:
                    steps |= set(steps_of(md[mode]))
    steps = sorted(steps)
    for cname, pd in errors.items():
        for mode in MODES:
            for pname, md in pd.items():
                if mode not in md:
                    continue
                row = [f"{cname} / {mode} / {pname}"]
                for n in steps:
                    v, lab = best_peer(md[mode], n)
                    row.append("—" if lab is None else f"{SHORT[lab]} {fmt(v)}")
                body.append(row)
    if not body or not any(c != "—" for r in body for c in r[1:]):
        return []
    return ["### Best peer (" + ", ".join(f"{s} = {lab}" for lab, s in SHORT.items()) + ")", ""] + \
        md_table(["config / mode / problem"] + [f"{n} steps" for n in steps], body) + [""]


def md_problem(cname, pname, md):
    """Detail of one (config, problem): error per mode with fastint/best-peer ratios, and best mode."""
    L = [f"<details><summary><b>{pname}, {cname}</b>: endpoint error per spacing mode</summary>", "",
         "*one-jump floor*: the error of the exact ODE solution down to the sigma of the last model call "
         "followed by one exact x0 = E[x0 | x] step, which is what a final step to sigma = 0 does to first "
         "order (a multistep final step can beat it); shown where all contestants share that sigma.", ""]
    for mode, rows in md.items():
        steps = steps_of(rows)
        body = [[lab] + [cell_text(rows, lab, n, "err", "err") for n in steps] for lab in labels_in(rows)]
        body += [["one-jump floor"] + [floor_text(rows, n) for n in steps]]
        body += [[f"ratio {lab}"] + [fmt(ratio(rows, lab, n), "ratio") for n in steps] for lab in fastint_labels(rows)
                 if any(ratio(rows, lab, n) is not None for n in steps)]
        L += [f"*{mode}*", ""] + md_table(["contestant"] + [f"{n}" for n in steps], body) + [""]
        deis = [(n, value(rows, "DEIS", n, "err_own")) for n in steps if value(rows, "DEIS", n, "err_own") is not None]
        if deis:
            L += ["DEIS ends at sigma_min, not 0; its error against the reference at its own last sigma: " +
                  ", ".join(f"{n}: {fmt(v)}" for n, v in deis) + ".", ""]
    L += md_best_mode(md) + ["</details>", ""]
    return L


def floor_text(rows, n):
    """The one-jump floor at n steps if every contestant of the table shares it, else 'varies'."""
    fl = [value(rows, lab, n, "floor") for lab in rows]
    fl = [f for f in fl if f is not None]
    if not fl:
        return "—"
    return fmt(fl[0]) if max(fl) <= 1.01 * min(fl) else "varies"


def md_best_mode(md, key="err", kind="err"):
    """Each contestant's best spacing mode per step count: 'value (mode)'."""
    labs = labels_in(*md.values())
    steps = sorted({n for rows in md.values() for n in steps_of(rows)})
    body = []
    for lab in labs:
        row = [lab]
        for n in steps:
            cand = [(value(rows, lab, n, key), mode) for mode, rows in md.items()]
            cand = [c for c in cand if c[0] is not None and math.isfinite(c[0])]
            row.append(f"{fmt(min(cand)[0], kind)} ({min(cand)[1]})" if cand else "—")
        body.append(row)
    return ["*best spacing mode per contestant:*", ""] + md_table(["contestant"] + [f"{n}" for n in steps], body) + [""]


def md_overhead(errors):
    """Median scheduler time per step (ms), over all runs of the analytic problems."""
    per = {}
    for pd in errors.values():
        for md in pd.values():
            for rows in md.values():
                for lab, d in rows.items():
                    per.setdefault(lab, []).extend(r["sched_ms"] for r in d.values() if "sched_ms" in r)
    body = [[lab, f"{float(np.median(per[lab])):.2f}"] for lab in labels_in(per) if per[lab]]
    if not body:
        return []
    return ["### Scheduler overhead", "", "Median wall time of the scheduler's own calls per step (set_timesteps "
            "amortised, model excluded), over the analytic runs (small tensors: this is Python/dispatch cost):", ""] + \
        md_table(["contestant", "ms / step"], body) + [""]


def md_fd(fd, floors):
    """FD tables: per spacing mode, and each contestant's best mode."""
    if not fd:
        return []
    L = ["### Learned model: shipped VP digits model, Fréchet distance (classifier features; lower is better)", "",
         "Floors: " + "; ".join(f"{k}: {fmt(v, 'fd')}" for k, v in floors.items()) + ".", ""]
    for mode, rows in fd.items():
        steps = steps_of(rows)
        body = [[lab] + [cell_text(rows, lab, n, "fd", "fd") for n in steps] for lab in labels_in(rows)]
        L += [f"*{mode}*", ""] + md_table(["contestant"] + [f"{n} steps" for n in steps], body) + [""]
    L += md_best_mode(fd, key="fd", kind="fd")
    return L


def write_markdown(res, path):
    a = res["args"]
    L = ["## Drop-in study: diffusers schedulers vs fastint's (generated by bench/study_dropin.py)", "",
         f"`{res['command']}`: {res['runtime_s']:.0f} s; batch {a['batch']} (digits {a['fd_batch']}), seed "
         f"{a['seed']}; torch {res['versions']['torch']}, diffusers {res['versions']['diffusers']}, fastint "
         f"{res['versions']['fastint']}. Method: the docstring of bench/study_dropin.py. Endpoint error = mean "
         "|x − x0_ref|₂ against DOP853 on the exact PF-ODE from the same draw; fastint's schedulers run in "
         "float32 (its fused step has no float64), the others in " + ("float32" if a.get("dtype") == "float32"
                                                                    else "float64") + ".", ""]
    if len(res.get("history", [])) > 1:
        L += ["Merged from these runs (`--merge`): " + "; ".join(f"`{h}`" for h in res["history"]) + ".", ""]
    skips = skipped_lines(res)
    if skips:
        L += ["### Skipped or failed contestants", ""] + skips + [""]
    errors = res.get("errors", {})
    if errors:
        L += md_headline(errors) + md_best_peer(errors)
        L += ["### Endpoint error per problem", ""]
        for cname, pd in errors.items():
            for pname, md in pd.items():
                L += md_problem(cname, pname, md)
        L += md_overhead(errors)
    L += md_fd(res.get("fd", {}), res.get("fd_floors", {}))
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ------------------------------------------------------------------------------ plot
def plot(res, path, mode="trailing"):
    """Endpoint error vs steps (rows: configs, columns: problems) in ``mode``, with the one-jump
    floor in black, and a last column of FD vs steps on the digits model (one spacing mode per row)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    errors, fd = res.get("errors", {}), res.get("fd", {})
    configs = list(errors)
    problems = list(dict.fromkeys(p for pd in errors.values() for p in pd))
    fd_modes = list(fd)
    ncol, nrow = len(problems) + (1 if fd else 0), max(len(configs), len(fd_modes), 1)
    if ncol == 0:
        return False
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.9 * nrow + 1.0), squeeze=False)
    cmap = plt.get_cmap("tab20")
    look = {}  # label -> (color, linestyle, marker): peers dashed squares, baselines dotted, fastint solid
    for i, c in enumerate(CONTESTANTS):
        ls, mk = {"peer": ("--", "s"), "baseline": (":", "x"), "fastint": ("-", "o")}[c.kind]
        look[c.label] = (cmap(i % 20), ls, mk)

    def curves(ax, rows, key, log_y=True):
        steps_all = steps_of(rows)
        for lab in labels_in(rows):
            pts = [(n, value(rows, lab, n, key)) for n in steps_of({lab: rows[lab]})]
            pts = [(n, y) for n, y in pts if y is not None and math.isfinite(y)]
            if pts:
                col, ls, mk = look[lab]
                ax.plot(*zip(*pts), ls, color=col, marker=mk, ms=3.5, lw=1.2, label=lab)
        if key == "err":
            fl = [(n, floor_text(rows, n)) for n in steps_all]
            fl = [(n, float(t)) for n, t in fl if t not in ("—", "varies")]
            if fl:
                ax.plot(*zip(*fl), "-.", color="black", lw=1.0, label="one-jump floor")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xticks(steps_all)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=7)
        ax.set_xlabel("steps (= model calls)", fontsize=8)

    for r in range(nrow):
        for c in range(ncol):
            axes[r][c].axis("off")
    for r, cname in enumerate(configs):
        for c, pname in enumerate(problems):
            rows = errors[cname].get(pname, {}).get(mode)
            if not rows:
                continue
            ax = axes[r][c]
            ax.axis("on")
            curves(ax, rows, "err")
            ax.set_title(f"{pname}\n{cname}, {mode}", fontsize=8)
            if c == 0:
                ax.set_ylabel("endpoint error", fontsize=8)
    for r, fmode in enumerate(fd_modes):
        ax = axes[r][ncol - 1]
        ax.axis("on")
        curves(ax, fd[fmode], "fd", log_y=False)
        ax.set_title(f"VP digits model\nFréchet distance, {fmode}", fontsize=8)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=7)
    fig.tight_layout(rect=(0, 1.0 / (2.9 * nrow + 1.0), 1, 1))
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
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 3 min): steps 5 10 20, batch 256; digits at 5 and 10 "
                    "steps, trailing and default spacing, 200 samples; writes to " + QUICK_DIR)
    ap.add_argument("--parts", nargs="+", choices=("errors", "fd"), default=("errors", "fd"),
                    help="endpoint errors on the exact models, Fréchet distance on the digits model (default both)")
    ap.add_argument("--problems", nargs="+", help="substring filters on problem names (e.g. 3-D narrow 64-D)")
    ap.add_argument("--configs", nargs="+", help=f"filters on {list(CONFIGS)}")
    ap.add_argument("--contestants", nargs="+", help="substring filters on labels ('=label' for an exact one); "
                    "keep the peers in for the ratio tables")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help="spacing modes (default all)")
    ap.add_argument("--steps", type=int, nargs="+", help=f"default {' '.join(map(str, STEPS))}")
    ap.add_argument("--fd-steps", type=int, nargs="+", help=f"default {' '.join(map(str, FD_STEPS))}")
    ap.add_argument("--fd-modes", nargs="+", choices=list(MODES), help="spacing modes of the digits part (default all)")
    ap.add_argument("--batch", type=int, help="draws per analytic problem (default 1000, --quick 256)")
    ap.add_argument("--fd-batch", type=int, help="digits per run (default 500, --quick 200)")
    ap.add_argument("--fd-converged", type=int, help="steps of a DPM-Solver++ 2M 'converged' FD row (default 100, "
                    "--quick 0 = none)")
    ap.add_argument("--dtype", choices=("auto", "float32"), default="auto",
                    help="auto: float64 where a scheduler allows it; float32: every scheduler in float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", help="where study_dropin.{json,md} and dropin_study.png go (default: bench/results "
                    "and docs for a full unfiltered run, else " + QUICK_DIR + ")")
    ap.add_argument("--commit", action="store_true", help="write to the committed places (bench/results, docs) "
                    "even for a quick or filtered run (use with --merge)")
    ap.add_argument("--merge", action="store_true", help="merge into the JSON already in the output place and "
                    "regenerate the markdown and the plot from the merged results")
    ap.add_argument("--render-only", action="store_true", help="measure nothing: regenerate the markdown and the "
                    "plot from the JSON in the output place")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    args.filtered = any(getattr(args, k) for k in ("problems", "configs", "contestants", "modes", "steps", "fd_steps",
                                                  "fd_modes")) or len(args.parts) < 2
    args.modes = args.modes or list(MODES)
    args.fd_modes = args.fd_modes or (["trailing", "default"] if q else list(MODES))
    args.steps = args.steps or ([5, 10, 20] if q else list(STEPS))
    args.fd_steps = args.fd_steps or ([5, 10] if q else list(FD_STEPS))
    args.batch = args.batch or (256 if q else 1000)
    args.fd_batch = args.fd_batch or (200 if q else 500)
    args.fd_converged = (0 if q else 100) if args.fd_converged is None else args.fd_converged
    args.force_dtype = torch.float32 if args.dtype == "float32" else None
    return args


def output_paths(args):
    """(json, md, png): the committed places for a full run or --commit, else --out-dir or QUICK_DIR."""
    if args.commit or not (args.out_dir or args.quick or args.filtered):
        res = os.path.join(ROOT, "bench", "results")
        return (os.path.join(res, "study_dropin.json"), os.path.join(res, "study_dropin.md"),
                os.path.join(ROOT, "docs", "dropin_study.png"))
    d = args.out_dir or QUICK_DIR
    return os.path.join(d, "study_dropin.json"), os.path.join(d, "study_dropin.md"), os.path.join(d, "dropin_study.png")


def measure(args, log):
    """Run the selected parts -> the results dict (errors, fd, fd_floors, reference)."""
    contestants = [c for c in CONTESTANTS if matches(c.label, args.contestants)]
    log(f"{len(contestants)} contestants; parts {' '.join(args.parts)}")
    res = {"errors": {}, "fd": {}, "fd_floors": {}, "reference": {}}
    if "errors" in args.parts:
        log(f"endpoint errors on the exact models (modes {args.modes}, steps {args.steps}, batch {args.batch}):")
        res["errors"], res["reference"] = run_errors(args, contestants, log)
    if "fd" in args.parts:
        log(f"Fréchet distance on the VP digits model (modes {args.fd_modes}, steps {args.fd_steps}, "
            f"batch {args.fd_batch}):")
        fd_args = argparse.Namespace(**{**vars(args), "modes": args.fd_modes})
        res["fd"], res["fd_floors"] = run_fd(fd_args, contestants, log)
    return res


def metadata(args, argv, runtime):
    import diffusers
    import fastint

    command = "python bench/study_dropin.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return {"command": command, "runtime_s": runtime, "history": [f"{command} ({runtime:.0f} s)"],
            "args": {k: v for k, v in vars(args).items() if k != "force_dtype"},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "fastint": getattr(fastint, "__version__", "?")},
            "contestants": [{"label": c.label, "cls": c.cls, "overrides": c.overrides, "kind": c.kind}
                            for c in CONTESTANTS],
            "configs": CONFIGS}


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

        t_start = time.perf_counter()
        res = measure(args, log)
        meta = metadata(args, argv, time.perf_counter() - t_start)
        if args.merge and os.path.exists(json_path):
            with open(json_path) as f:
                old = json.load(f)
            meta["history"] = old.get("history", []) + meta["history"]
            res = deep_merge(old, res)
        res.update(meta)
        for p in (json_path, md_path, png_path):
            os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    write_markdown(res, md_path)
    plotted = not args.no_plot and plot(res, png_path)
    log(f"wrote {'' if args.render_only else json_path + ', '}{md_path}" + (f", {png_path}" if plotted else "") +
        f" ({res['runtime_s']:.0f} s of measuring)")


if __name__ == "__main__":
    main()
