"""Flow-matching schedulers on a *learned* velocity model: a rectified-flow ContinuousUNet on the digits.

    python bench/study_flow_digits.py             # train (or load /tmp/fastint_flow_digits.pt) + evaluate:
                                                  # /tmp/fastint_flow_digits/study_flow_digits.{json,md}
    python bench/study_flow_digits.py --commit    # ... written to bench/results/study_flow_digits.{json,md}
                                                  # (~5 min of training, ~20-25 min of evaluation on 1 core)
    python bench/study_flow_digits.py --train-only --ship fastint/checkpoints/cunet_flow_digits.pt
    python bench/study_flow_digits.py --fastint "k=2 sigma2" '{"solver_order": 2, "interp": "sigma2"}' \\
        --contestants fastint Euler --calls 5 10      # other fastint rows, fewer peers / budgets

The learned-model half of bench/study_flow.py (which scores the same schedulers on exact
Gaussian-mixture velocities): here the velocity is a network's, with its errors, and the
samples are judged by Fréchet distance, as bench/study_sampler_digits.py and
bench/study_dropin.py judge the VP model's.

Model
-----
``fastint.train.make_model("cunet", VPSDE())`` (ARCH_DEFAULTS: ch 32, ch_mult (1, 2), one RK4
step per ODE block, attention, the time-conditioned linear skip; the VPSDE only fixes one
state channel) trained on the 1500-image train split of ``fastint.data.load_digits``
(pixels in [-1, 1]) with the rectified-flow loss

    x_σ = (1 − σ) x0 + σ ε,   loss = ‖model(x_σ, σ) − (ε − x0)‖²   (mean over pixels),

σ the network's time input (a float in [0, 1]; ContinuousUNet embeds 1000 σ). σ is drawn
*uniformly* on [0, 1], stratified per batch like fastint.train.sample_times (one draw per
stratum, randomly shifted) -- not SD3's logit-normal: the logit-normal (m = 0, s = 1) puts
little weight on the two ends, and the samplers studied here spend calls exactly there (the
first call at σ = 1, the last one at σ ≈ 0.001-0.2, and shift 3 moves most calls to σ > 0.7);
SD3 chose it for perceptual quality of large images at a fixed sampler, whereas this study
wants the network about equally good wherever a scheduler may query it (``--sigma-sampling
logit-normal`` trains the other way). Optimiser and the rest as fastint.train.train_denoiser:
Adam lr 2e-3, linear warm-up over 100 steps, gradient clipping at 1, EMA 0.999 with the
warm-up decay min(0.999, (1 + n)/(10 + n)), seeds torch.manual_seed(0) for the weights and a
Generator(1) for batches, σ and ε; 2000 steps of batch 64 (TRAIN_DEFAULTS). The EMA weights
are what is evaluated and saved.

Cache and shipped copy. ``--weights`` (default /tmp/fastint_flow_digits.pt) holds a
fastint checkpoint (fastint.models.checkpoint format, float32 EMA weights, the config, the
loss history) and is reused when present (``--retrain`` ignores it). ``--ship PATH`` writes
the float16 weights-only copy, as fastint.train.ship_checkpoint does. Both carry
``process: None`` (the network is *not* an ε-model of any fastint process, so
load_checkpoint(path, process="vp") refuses it) and ``prediction: "flow"`` plus
meta["parameterization"] describing the convention; load_checkpoint(path).model rebuilds it.
A held-out loss (the 297 test digits at 10 fixed σ, fixed ε) is recorded with the history.

Evaluation
----------
Contestants and loop are bench/study_flow.py's (imported from it): each scheduler is
``Cls.from_config(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).config,
**overrides)`` (DPM-Solver++ / UniPC with use_flow_sigmas=True, prediction_type="flow_prediction",
flow_shift=shift), driven by the standard diffusers loop at its own sigmas and timesteps
(study_flow.flow_loop), the network called with σ = the scheduler's own sigma of that call
(sch.sigmas[i], not the truncated integer timestep) as a float32 [B] tensor; the state is
float32 (the network's dtype). Calls, not steps: for a budget of C calls each contestant runs
the largest num_inference_steps that makes <= C calls (study_flow.steps_for_calls; Heun makes
2n − 1, so it only hits odd C: a cell shows the calls used in parentheses when fewer).

Prior draws: torch.randn(500, 1, 8, 8) from Generator().manual_seed(seed), the same for every
run. FD: fastint.metrics.frechet_distance (the shipped classifier's features) against all 1797
digits. ``rms``: RMS over samples and pixels of x − x_conv, x_conv the "converged" samples
(FlowMatch Heun, 200 steps = 399 calls, at the same shift, from the same draws): the solver's
own error on the learned ODE, far less noisy than FD (FDs of 500 samples from different
draws spread by more than many of the differences between solvers here). The converged rows
(``--converged``: FlowMatch Heun, optionally UniPC bh2, at 200 steps, each shift) solve the
same ODE (the shift only moves the steps), so they must agree with each other: their RMS
differences are reported, and their FD is the model's own FD.
The converged sample sets are cached next to the weights (``<weights>_converged.pt``, keyed by
a fingerprint of the weights, the draws, the steps and the shift), so that re-runs and
``--merge`` runs of a few rows do not repeat them.
Floor: the FD of 500 real digits (a seed+1 permutation) against all 1797, as study_dropin.
``ratio`` rows: a fastint row's FD over the best peer's FD in the same column.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import study_flow as sf  # noqa: E402  (bench/study_flow.py: contestants, from_config, the loop)

DEFAULT_WEIGHTS = "/tmp/fastint_flow_digits.pt"
DEFAULT_OUT = "/tmp/fastint_flow_digits"
CALLS = (5, 8, 10, 15, 20, 50)
SHIFTS = (1.0, 3.0)
CONVERGED_STEPS = 200
TRAIN = dict(steps=2000, batch=64, lr=2e-3, warmup=100, ema=0.999, seed=0)
EVAL_SIGMAS = tuple((i + 0.5) / 10 for i in range(10))  # the held-out loss's fixed sigmas

# label -> from_config overrides of FlowMatchConjugateScheduler (the --fastint default set). The
# corrector is always given explicitly: the class default changes (corrector=True at the time of
# writing, which makes solver_order=1 a corrected Euler, not Euler, and solver_order=3 corrects
# its first step).
DEFAULT_FASTINT = [
    ("k=2 sigma2", {"solver_order": 2, "interp": "sigma2", "corrector": False}),
    ("k=2 sigma2 +C", {"solver_order": 2, "interp": "sigma2", "corrector": True}),
    ("k=3 sigma2", {"solver_order": 3, "interp": "sigma2", "corrector": False}),
    ("k=3 sigma2 +C", {"solver_order": 3, "interp": "sigma2", "corrector": True}),
    ("k=2 sigma", {"solver_order": 2, "interp": "sigma", "corrector": False}),
    ("k=2 sigma +C", {"solver_order": 2, "interp": "sigma", "corrector": True}),
    ("k=3 sigma", {"solver_order": 3, "interp": "sigma", "corrector": False}),
    ("k=3 sigma +C", {"solver_order": 3, "interp": "sigma", "corrector": True}),
    ("k=1 (Euler)", {"solver_order": 1, "corrector": False}),
    ("k=1 +C", {"solver_order": 1, "corrector": True}),
]
METHOD_KEYS = ("solver_order", "interp", "corrector", "lower_final", "final_step")


def fastint_defaults():
    """The method options FlowMatchConjugateScheduler defaults to now (None if it is missing)."""
    cls = sf.Contestant("", sf.FMC).resolve()
    if cls is None:
        return None
    cfg = cls.from_config(sf.base_config(1.0)).config
    return {k: cfg[k] for k in METHOD_KEYS if k in cfg}


def peer_contestants():
    C = sf.Contestant
    return [
        C("FlowMatch Euler", "diffusers.FlowMatchEulerDiscreteScheduler"),
        C("FlowMatch Heun", "diffusers.FlowMatchHeunDiscreteScheduler"),
        C("DPM-Solver++ 2M", sf.DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}, flow=True),
        C("DPM-Solver++ 3M", sf.DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3}, flow=True),
        C("UniPC bh2", sf.UNIPC, {"solver_type": "bh2", "solver_order": 2}, flow=True),
        C("UniPC bh2 order 3", sf.UNIPC, {"solver_type": "bh2", "solver_order": 3}, flow=True),
    ]


def contestants_for(args):
    """Peers, then the --fastint rows; the class defaults get a row of their own unless one of
    the override sets builds the same config (that row's label then says "= class defaults")."""
    out = peer_contestants()
    cls = sf.Contestant("", sf.FMC).resolve()
    if cls is None:
        print(f"no fastint rows: {sf.fastint_status()}", file=sys.stderr)
        return [c for c in out if sf.matches(c.label, args.contestants)]
    base = sf.base_config(1.0)

    def cfg(over):
        try:
            return {k: v for k, v in cls.from_config(base, **over).config.items() if not k.startswith("_")}
        except (TypeError, ValueError):
            return None

    default = cfg({})
    fast, seen = [], False
    for lab, over in args.fastint:
        same = default is not None and cfg(over) == default
        seen |= same
        fast.append(sf.Contestant(f"fastint FMC {lab}" + (" (= class defaults)" if same else ""), sf.FMC, over,
                                  kind="fastint"))
    if not seen:
        fast.insert(0, sf.Contestant("fastint FMC (class defaults)", sf.FMC, kind="fastint"))
    return [c for c in out + fast if sf.matches(c.label, args.contestants)]


# ------------------------------------------------------------------------------ training
def flow_pair(x0, sigma, eps):
    """(x_sigma, target v) of the rectified-flow path: x_σ = (1 − σ) x0 + σ ε, v = ε − x0."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * eps, eps - x0


def sample_sigmas(n, how, generator):
    """n training sigmas in [0, 1]: stratified uniform (default) or logit-normal(0, 1) (SD3)."""
    from fastint.train import sample_times

    if how == "uniform":
        return sample_times(n, 0.0, 1.0, generator).float()
    return torch.sigmoid(torch.randn(n, generator=generator)).float()


def flow_loss(model, x0, generator, how="uniform"):
    sigma = sample_sigmas(x0.shape[0], how, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    xs, v = flow_pair(x0, sigma, eps)
    return F.mse_loss(model(xs, sigma), v)


@torch.no_grad()
def heldout_loss(model, x_test, seed=123):
    """Velocity MSE on the test split at the fixed EVAL_SIGMAS (fixed ε) -> (mean, {sigma: mse})."""
    g = torch.Generator().manual_seed(seed)
    per = {}
    for s in EVAL_SIGMAS:
        eps = torch.randn(x_test.shape, generator=g)
        sig = torch.full((len(x_test),), s)
        xs, v = flow_pair(x_test, sig, eps)
        per[f"{s:.2f}"] = float(F.mse_loss(model.eval()(xs, sig), v))
    return sum(per.values()) / len(per), per


def train_flow(args, log):
    """Train the EMA velocity model -> (ema_model, meta)."""
    from fastint import VPSDE
    from fastint.data import load_digits
    from fastint.train import EMA, _lr_lambda, make_model

    cfg = dict(TRAIN, steps=args.steps, batch=args.batch, sigma_sampling=args.sigma_sampling)
    x_train = load_digits("train")[0]
    torch.manual_seed(cfg["seed"])
    model = make_model("cunet", VPSDE(), x_train.shape[1]).train()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"]))
    ema = EMA(model, cfg["ema"])
    hist, running, first = [], None, None
    t0 = time.perf_counter()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, len(x_train), (cfg["batch"],), generator=g)
        loss = flow_loss(model, x_train[idx], g, cfg["sigma_sampling"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        li = loss.item()
        first = li if first is None else first
        running = li if running is None else 0.98 * running + 0.02 * li
        if (step + 1) % 50 == 0:
            hist.append((step + 1, running))
        if (step + 1) % 250 == 0:
            log(f"  step {step + 1}/{cfg['steps']}: loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    test_mean, test_per = heldout_loss(ema.model, load_digits("test")[0])
    meta = dict(steps=cfg["steps"], train_config=cfg, seconds=round(seconds, 1), threads=torch.get_num_threads(),
                first_loss=round(first, 5), final_loss=round(running, 5), history=[list(h) for h in hist],
                heldout_loss=round(test_mean, 5), heldout_loss_per_sigma={k: round(v, 5) for k, v in test_per.items()},
                dataset="sklearn digits, train split")
    log(f"trained cunet flow model: {cfg['steps']} steps, batch {cfg['batch']}, {seconds:.0f} s, first loss "
        f"{first:.4f}, final (running) loss {running:.4f}, held-out EMA loss {test_mean:.4f}")
    return ema.model.eval(), meta


PARAMETERIZATION = ("rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0 and is "
                    "called as model(x_sigma, sigma) with sigma in [0, 1] (float [B]); sample by integrating "
                    "dx/dsigma = v from sigma = 1 to 0 (diffusers FlowMatch convention, timestep = 1000 sigma)")


def save_flow_checkpoint(path, model, meta, half=False):
    """A fastint checkpoint of the velocity model: process None, prediction "flow"."""
    from fastint.data import DATA_SHAPE
    from fastint.models.checkpoint import make_checkpoint

    meta = dict(meta, parameterization=PARAMETERIZATION, weights="EMA")
    ck = make_checkpoint(model, None, DATA_SHAPE, meta=meta, half=half)
    ck["prediction"] = "flow"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(ck, tmp)
    os.replace(tmp, path)
    return path


def load_flow_checkpoint(path):
    from fastint.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    ck = loaded.checkpoint
    if ck.get("prediction") != "flow":
        raise ValueError(f"{path!r} is not a flow (velocity) checkpoint: prediction {ck.get('prediction')!r}")
    return loaded.model.eval(), ck["meta"]


def get_model(args, log):
    """(model, training meta, "loaded" | "trained"), from --weights when it exists."""
    if os.path.exists(args.weights) and not args.retrain:
        model, meta = load_flow_checkpoint(args.weights)
        want = dict(steps=args.steps, batch=args.batch, sigma_sampling=args.sigma_sampling)
        got = {k: meta.get("train_config", {}).get(k) for k in want}
        if got != want:
            log(f"note: {args.weights} was trained with {got}, not {want} (use --retrain to retrain)")
        log(f"loaded {args.weights} ({meta.get('steps')} steps, {meta.get('seconds')} s of training, final loss "
            f"{meta.get('final_loss')})")
        return model, meta, "loaded"
    torch.set_num_threads(args.train_threads)
    model, meta = train_flow(args, log)
    torch.set_num_threads(args.threads)
    save_flow_checkpoint(args.weights, model, meta)
    log(f"wrote {args.weights}")
    return model, meta, "trained"


# ------------------------------------------------------------------------------ evaluation
class NetVelocity(sf.CountingModel):
    """The network in diffusers' loop convention, model(x, t) -> v, counting its calls; it is
    evaluated at sigma = the scheduler's own sigma of the call (study_flow.CountingModel's rule)."""

    def __init__(self, net):
        super().__init__(None)
        self.net = net

    @torch.no_grad()
    def __call__(self, x, t):
        s = self.sigma(t)
        self.calls += 1
        sig = torch.full((x.shape[0],), s, dtype=torch.float32)
        return self.net(x.float(), sig).to(x.dtype)


def run_one(con, shift, model, noise, steps):
    """(Run, None) or (None, why): the loop in float32 (the network's dtype)."""
    sch, skip = sf.build_scheduler(con, shift)
    if sch is None:
        return None, skip
    try:
        return sf.flow_loop(sch, model, con, noise, steps, shift), None
    except (TypeError, RuntimeError, ValueError, NotImplementedError, IndexError, KeyError, AssertionError) as e:
        return None, f"error in the loop: {type(e).__name__}: {e}"


def rms(d):
    return float(d.double().pow(2).mean().sqrt())


def fingerprint(net):
    """A short identity of the weights (for the converged-samples cache)."""
    sd = net.state_dict()
    return f"{sum(v.numel() for v in sd.values())}:{sum(float(v.double().abs().sum()) for v in sd.values()):.12e}"


def evaluate(args, net, contestants, log, cache_path=None):
    """-> (fd rows, floors, converged records, converged FD floors, seconds). cache_path: a file
    keeping the converged sample sets (keyed by weights, draws, steps, shift, label)."""
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    cache = torch.load(cache_path, weights_only=True) if cache_path and os.path.exists(cache_path) else {}
    fp = fingerprint(net)

    real = load_digits("all")[0]
    init = torch.randn(args.fd_batch, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    model = NetVelocity(net)

    def fd(x):
        return frechet_distance(x.float(), real) if torch.isfinite(x).all() else math.inf

    sub = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed + 1))[:args.fd_batch]]
    floors = {f"{args.fd_batch} real digits": frechet_distance(sub, real)}
    out, converged, conv_x = {}, {}, {}
    t0 = time.perf_counter()
    for shift in args.shifts:
        skey = f"shift {shift:g}"
        conv = converged.setdefault(skey, {})
        for con in sorted((c for c in peer_contestants() if c.label in args.converged),
                          key=lambda c: args.converged.index(c.label)):
            key = f"{fp}|seed {args.seed}|batch {args.fd_batch}|{con.label}|{args.converged_steps} steps|{skey}"
            if key in cache:
                rec = dict(json.loads(cache[key]["record"]), cached=True)
                x = cache[key]["x"]
            else:
                run, why = run_one(con, shift, model, init, args.converged_steps)
                if run is None:
                    conv[con.label] = {"error": why}
                    continue
                x = run.x
                rec = {"steps": args.converged_steps, "calls": run.calls, "fd": fd(x), "sigma0": run.sigma0,
                       "sigma_last": run.sigma_last}
                if cache_path:
                    cache[key] = {"x": x.clone(), "record": json.dumps(rec)}
                    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
                    torch.save(cache, cache_path)
            conv[con.label] = rec
            conv_x[(skey, con.label)] = x
        ref = conv_x.get((skey, args.converged[0]))
        if ref is not None:
            for lab, x in conv_x.items():
                if lab[0] == skey:
                    conv[lab[1]]["rms_vs_ref"] = rms(x - ref)
        log(f"  {skey}: converged rows " + ", ".join(f"{k} FD {v.get('fd', float('nan')):.3f}"
                                                   for k, v in conv.items()) + f" ({time.perf_counter() - t0:.0f} s)")
        rows = out.setdefault(skey, {})
        for con in contestants:
            d = rows.setdefault(con.label, {})
            for c in args.calls:
                n, k = sf.steps_for_calls(con, shift, c)
                if n is None:
                    d[str(c)] = {"skipped": k} if (k.startswith("from_config") or k.endswith("does not exist")) \
                        else {"n/a": k}
                    continue
                run, why = run_one(con, shift, model, init, n)
                if run is None:
                    d[str(c)] = {"skipped": why} if why.startswith("from_config") else {"error": why}
                    continue
                assert run.calls == k, f"{con.label}: {run.calls} model calls counted, {k} timesteps"
                finite = bool(torch.isfinite(run.x).all())
                d[str(c)] = {"fd": fd(run.x), "calls": run.calls, "steps": n, "sigma0": run.sigma0,
                             "sigma_last": run.sigma_last,
                             "rms": rms(run.x - ref) if (finite and ref is not None) else math.inf,
                             "sched_ms": 1e3 * run.sched_s / max(run.calls, 1)}
            log(f"  {skey} {con.label:40s} " + " ".join(
                f"{c}:{d[str(c)].get('fd', float('nan')):.3f}" for c in args.calls) +
                f"  ({time.perf_counter() - t0:.0f} s)")
    # the converged samples do not depend on the shift (the same ODE): check they agree
    sk = [f"shift {s:g}" for s in args.shifts]
    r0 = args.converged[0]
    if len(sk) > 1 and all((s, r0) in conv_x for s in sk):
        converged[f"rms {r0} {sk[0]} vs {sk[1]}"] = rms(conv_x[(sk[0], r0)] - conv_x[(sk[1], r0)])
    floors_conv = {f"{lab} {args.converged_steps} steps, {skey}": v["fd"]
                   for skey, per in converged.items() if isinstance(per, dict)
                   for lab, v in per.items() if "fd" in v}
    return out, floors, converged, floors_conv, time.perf_counter() - t0


# ------------------------------------------------------------------------------ tables
def fmt(v, kind="fd"):
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "diverged"
    return {"fd": f"{v:.3f}", "rms": f"{v:.2e}", "ratio": f"{v:.2f}"}[kind]


def val(rows, lab, c, key="fd"):
    v = rows.get(lab, {}).get(str(c), {}).get(key)
    return None if v is None else float(v)


def best_of(rows, c, key, kinds):
    cand = [(val(rows, lab, c, key), lab) for lab in rows if KINDS.get(lab, "peer") in kinds]
    cand = [x for x in cand if x[0] is not None and math.isfinite(x[0])]
    return min(cand) if cand else (None, None)


KINDS = {}


def cell(rows, lab, c, key, best):
    rec = rows.get(lab, {}).get(str(c))
    if rec is None:
        return "—"
    for k in ("skipped", "error", "n/a"):
        if k in rec:
            return k
    v = rec.get(key)
    txt = fmt(v, key)
    if best is not None and v is not None and math.isfinite(v) and v <= best:
        txt = f"**{txt}**"
    if rec.get("calls", c) != c:
        txt += f" ({rec['calls']})"
    return txt


def row_order(lab):
    """Peers in peer_contestants() order, then fastint rows in DEFAULT_FASTINT order, then the rest."""
    peers = [c.label for c in peer_contestants()]
    if lab in peers:
        return (0, peers.index(lab), lab)
    base = lab.replace(" (= class defaults)", "")
    fast = [f"fastint FMC {x}" for x, _ in DEFAULT_FASTINT]
    return (1, fast.index(base), lab) if base in fast else (2, 0, lab)


def md_shift(skey, rows, calls, key):
    rows = {lab: rows[lab] for lab in sorted(rows, key=row_order)}
    body = []
    best = {c: best_of(rows, c, key, ("peer", "fastint"))[0] for c in calls}
    for lab in rows:
        body.append([lab] + [cell(rows, lab, c, key, best[c]) for c in calls])
    for lab in rows:
        if KINDS.get(lab) == "fastint":
            rat = []
            for c in calls:
                v, (b, _) = val(rows, lab, c, key), best_of(rows, c, key, ("peer",))
                rat.append(fmt(v / b, "ratio") if v is not None and b else "—")
            body.append([f"{lab} / best peer"] + rat)
    L = sf.md_table(["contestant"] + [f"{c} calls" for c in calls], body) + [""]
    bp = [best_of(rows, c, key, ("peer",))[1] or "—" for c in calls]
    ba = [best_of(rows, c, key, ("peer", "fastint"))[1] or "—" for c in calls]
    L += ["Best peer per column: " + ", ".join(f"{c}: {b}" for c, b in zip(calls, bp)) + ".",
          "Best overall per column: " + ", ".join(f"{c}: {b}" for c, b in zip(calls, ba)) + ".", ""]
    return L


def md_training(tr, source, weights):
    h = tr.get("history", [])
    pts = [p for p in h if p[0] in (50, 250, 500, 1000, 1500, 2000)] or h[:: max(1, len(h) // 6)]
    cfg = tr.get("train_config", {})
    L = ["### Training", "",
         f"{source} `{weights}`: {tr.get('steps')} steps of batch {cfg.get('batch')}, σ {cfg.get('sigma_sampling')}, "
         f"Adam lr {cfg.get('lr')}, warm-up {cfg.get('warmup')}, EMA {cfg.get('ema')}, clip 1; "
         f"{tr.get('seconds')} s on {tr.get('threads')} thread(s). First batch loss {tr.get('first_loss')}, final "
         f"running loss (EMA 0.98 of batch losses) {tr.get('final_loss')}; held-out velocity MSE of the EMA "
         f"model (297 test digits, σ = 0.05 ... 0.95) {tr.get('heldout_loss')}.", "",
         "Running loss: " + ", ".join(f"step {s}: {v:.4f}" for s, v in pts) + ".", ""]
    per = tr.get("heldout_loss_per_sigma")
    if per:
        L += ["Held-out MSE per σ: " + ", ".join(f"{k}: {v:.4f}" for k, v in per.items()) + ".", ""]
    return L


def write_markdown(res, path):
    a = res["args"]
    KINDS.update({c["label"]: c["kind"] for c in res["contestants"]})
    L = ["## Flow-matching schedulers on a learned velocity model (digits; generated by "
         "bench/study_flow_digits.py)", "",
         f"`{res['command']}`: evaluation {res['eval_s']:.0f} s on {a['threads']} thread(s); {a['fd_batch']} samples "
         f"from seed {a['seed']}; torch {res['versions']['torch']}, diffusers {res['versions']['diffusers']}, "
         f"fastint {res['versions']['fastint']}. Method: the docstring of bench/study_flow_digits.py. FD = Fréchet "
         "distance in the digit classifier's features against all 1797 digits (lower is better); columns are "
         "model calls (parentheses: the calls actually made, when fewer); best per column in bold; *ratio* rows: "
         "a fastint row's value over the best peer's.", ""]
    if len(res.get("history", [])) > 1:
        L += ["Merged from these runs (`--merge`): " + "; ".join(f"`{h}`" for h in res["history"]) + ".", ""]
    if res.get("fastint_defaults"):
        L += ["FlowMatchConjugateScheduler's defaults in this run: " +
              ", ".join(f"{k}={v!r}" for k, v in res["fastint_defaults"].items()) +
              " (the row marked \"= class defaults\" builds this config).", ""]
    L += md_training(res["training"], res["model_source"], a["weights"])
    L += ["### Floors and converged rows", "",
          "; ".join(f"{k}: {fmt(v)}" for k, v in {**res["floors"], **res["floors_converged"]}.items()) + ".", ""]
    agree = [f"{k}: {v:.2e}" for k, v in res["converged"].items() if not isinstance(v, dict)]
    r0 = a["converged"][0]
    agree += [f"{lab} vs {r0} ({skey}): {v['rms_vs_ref']:.2e}" for skey, per in res["converged"].items()
              if isinstance(per, dict) for lab, v in per.items() if lab != r0 and "rms_vs_ref" in v]
    if agree:
        L += ["RMS differences between converged sample sets (same draws): " + "; ".join(agree) + ".", ""]
    for skey, rows in res["fd"].items():
        L += [f"### FD, {skey}", ""] + md_shift(skey, rows, a["calls"], "fd")
    L += [f"### RMS distance to the converged samples ({r0}, "
          f"{a['converged_steps']} steps, same shift, same draws)", "",
          "The solver error on the learned ODE itself (no FD sampling noise).", ""]
    for skey, rows in res["fd"].items():
        L += [f"#### {skey}", ""] + md_shift(skey, rows, a["calls"], "rms")
    errs = [f"- {lab} ({skey}, {c} calls): {next(rec[k] for k in ('skipped', 'error', 'n/a') if k in rec)}"
            for skey, rows in res["fd"].items() for lab, d in rows.items() for c, rec in d.items()
            if any(k in rec for k in ("skipped", "error", "n/a"))]
    if errs:
        L += ["### Skipped or failed", ""] + errs + [""]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help=f"model cache (default {DEFAULT_WEIGHTS}); "
                    "trained and written when missing, else loaded")
    ap.add_argument("--retrain", action="store_true", help="train even if --weights exists (and overwrite it)")
    ap.add_argument("--ship", default=None, help="also write the float16 weights-only copy here")
    ap.add_argument("--train-only", action="store_true", help="train/load (and --ship), evaluate nothing")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help=f"training steps (default {TRAIN['steps']})")
    ap.add_argument("--batch", type=int, default=TRAIN["batch"], help=f"training batch (default {TRAIN['batch']})")
    ap.add_argument("--sigma-sampling", choices=("uniform", "logit-normal"), default="uniform",
                    help="training sigma distribution (default: stratified uniform on [0, 1])")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads while training (default 1: on "
                    "the shared 2-core machine, with another job running, 2 threads measured 0.24 s/step against "
                    "0.16 s/step for 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the evaluation (default 1)")
    ap.add_argument("--fastint", nargs=2, action="append", default=None, metavar=("LABEL", "JSON"),
                    help="a fastint row 'fastint FMC LABEL' with these from_config overrides (repeatable; "
                    "replaces the default set: " + "; ".join(f"{lab} {json.dumps(o)}" for lab, o in DEFAULT_FASTINT)
                    + ")")
    ap.add_argument("--contestants", nargs="+", help="substring filters on labels ('=label' for an exact one)")
    ap.add_argument("--calls", type=int, nargs="+", help=f"model-call budgets (default {' '.join(map(str, CALLS))})")
    ap.add_argument("--shifts", type=float, nargs="+", help=f"default {' '.join(f'{s:g}' for s in SHIFTS)}")
    ap.add_argument("--converged-steps", type=int, default=CONVERGED_STEPS,
                    help=f"steps of the converged Heun / UniPC rows (default {CONVERGED_STEPS})")
    ap.add_argument("--converged", nargs="+", default=["FlowMatch Heun"], choices=("FlowMatch Heun", "UniPC bh2"),
                    help="converged rows at --converged-steps, each shift (default FlowMatch Heun; the first one "
                    "is the reference of the rms tables)")
    ap.add_argument("--fd-batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help=f"default {DEFAULT_OUT}")
    ap.add_argument("--commit", action="store_true", help="write bench/results/study_flow_digits.{json,md}")
    ap.add_argument("--merge", action="store_true", help="merge these rows into the JSON already in the output "
                    "place (same weights, seed and batch) and regenerate the markdown from the merged results")
    ap.add_argument("--render-only", action="store_true", help="evaluate nothing: regenerate the markdown from "
                    "the JSON in the output place")
    args = ap.parse_args(argv)
    args.fastint = DEFAULT_FASTINT if args.fastint is None else [(lab, json.loads(js)) for lab, js in args.fastint]
    args.calls = sorted(args.calls or CALLS)
    args.shifts = args.shifts or list(SHIFTS)
    return args


def merge_results(old, new):
    """new's rows, contestants and converged/floor records over old's; the union of both."""
    for skey, rows in new["fd"].items():
        old["fd"].setdefault(skey, {}).update(rows)
    known = {c["label"] for c in new["contestants"]}
    old["contestants"] = [c for c in old["contestants"] if c["label"] not in known] + new["contestants"]
    for k in ("floors", "floors_converged", "converged"):
        old[k] = {**old.get(k, {}), **new[k]}
    old["history"] = old.get("history", [old["command"]]) + [new["command"]]
    old["eval_s"] = old.get("eval_s", 0.0) + new["eval_s"]
    for k in ("versions", "fastint_defaults", "training", "model_source"):
        old[k] = new[k]
    return old


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    d = os.path.join(ROOT, "bench", "results") if args.commit else (args.out_dir or DEFAULT_OUT)
    jp, mp = os.path.join(d, "study_flow_digits.json"), os.path.join(d, "study_flow_digits.md")
    if args.render_only:
        with open(jp) as f:
            write_markdown(json.load(f), mp)
        log(f"wrote {mp}")
        return
    import diffusers
    from diffusers.utils import logging as dlog

    import fastint

    dlog.set_verbosity_error()
    net, train_meta, source = get_model(args, log)
    if args.ship:
        meta = {k: train_meta[k] for k in ("steps", "train_config", "seconds", "final_loss", "heldout_loss",
                                           "dataset") if k in train_meta}
        save_flow_checkpoint(args.ship, net, meta, half=True)
        log(f"wrote {args.ship} ({os.path.getsize(args.ship)} bytes, float16)")
    if args.train_only:
        return
    contestants = contestants_for(args)
    log(f"{len(contestants)} contestants; calls {args.calls}; shifts {args.shifts}; {args.fd_batch} samples")
    fd, floors, converged, floors_conv, eval_s = evaluate(args, net, contestants, log,
                                                          os.path.splitext(args.weights)[0] + "_converged.pt")
    command = "python bench/study_flow_digits.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {"command": command, "eval_s": eval_s, "model_source": "loaded from" if source == "loaded" else
           "trained now, written to", "training": train_meta,
           "args": {k: v for k, v in vars(args).items()},
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "fastint": getattr(fastint, "__version__", "?")},
           "contestants": [{"label": c.label, "cls": c.cls, "overrides": c.overrides, "kind": c.kind, "flow": c.flow}
                           for c in contestants],
           "fastint_defaults": fastint_defaults(),
           "floors": floors, "floors_converged": floors_conv, "converged": converged, "fd": fd}
    res["history"] = [command]
    os.makedirs(d, exist_ok=True)
    if args.merge and os.path.exists(jp):
        with open(jp) as f:
            old = json.load(f)
        same = {k: (old["args"].get(k), res["args"][k]) for k in ("weights", "seed", "fd_batch", "converged_steps")}
        bad = {k: v for k, v in same.items() if v[0] != v[1]}
        if bad:
            raise SystemExit(f"--merge: {jp} was measured with other settings: {bad}")
        res = merge_results(old, res)
    with open(jp, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, mp)
    log(f"wrote {jp}, {mp} (evaluation {eval_s:.0f} s)")


if __name__ == "__main__":
    main()
