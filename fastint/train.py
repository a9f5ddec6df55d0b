"""`fastint train`: train a denoiser (VP / PSLD / CLD) or the digit classifier on the 8x8 digits.

Loss (docs/design.md, "Processes"; ε convention). For a process with marginal z_t | z_0 ~ N(Ψ(t,0) z_0, K_t):

- VP: z_0 = x_0, z_t = α_t x_0 + σ_t ε, and the loss is E‖ε_θ(z_t, t) − ε‖².
- PSLD / CLD, hybrid score matching: only x_0 is data; the momentum m_0 ~ N(0, κM I) is
  integrated out, so z_t | x_0 ~ N(μ_t, Σ_t) with μ_t = Ψ(t,0)(x_0, 0) and
  Σ_t = Ψ(t,0) diag(0, κM) Ψ(t,0)ᵀ + K_t (plus the jitter), per pixel. With L_t the lower
  Cholesky factor of Σ_t, z_t = μ_t + L_t ε, and the conditional score is
  ∇ log p(z_t | x_0) = −Σ_t⁻¹(z_t − μ_t) = −L_t^{−T} ε: exactly the sampler's ε convention
  s = −L_t^{−T} ε. Regressing ε (both channels) therefore trains the model the samplers expect.

The same code does both (VP is the dim = 1 case, with L_t = σ_t). Times are stratified
uniform on [t_min, T] (t_min = 1e-3, the samplers' t_eps). Adam, linear warm-up, gradient
clipping at 1, an exponential moving average (EMA) of the weights that is what gets
shipped. Checkpoints (`--out`) hold the EMA weights, the config and the process, plus the
raw weights, optimizer, EMA and RNG states for `--resume`; `--ship` writes a small
weights-only copy (float16).
"""
import copy
import time

import torch
from torch.nn import functional as F

from .data import DATA_SHAPE, load_digits
from .models.checkpoint import PROCESS_NAMES, build_model, load_checkpoint, save_checkpoint
from .models.classifier import DigitClassifier
from .models.continuous_unet import ContinuousUNet
from .models.unet import UNet
from . import processes as _processes

# The default architectures for 8x8 digits (a few minutes of training on 2 CPU cores).
ARCH_DEFAULTS = {
    "cunet": dict(ch=32, ch_mult=(1, 2), ode_steps=1, attention=True, resolution=8),
    "unet": dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1, resolution=8,
                 linear_skip=True),
}
TRAIN_DEFAULTS = dict(steps=2000, batch=64, lr=2e-3, warmup=100, ema=0.999, t_min=1e-3, seed=0)


def make_process(process):
    """'vp' / 'psld' / 'cld' (default parameters) or a fastint process."""
    if isinstance(process, str):
        if process.lower() not in PROCESS_NAMES:
            raise ValueError(f"process must be one of {sorted(PROCESS_NAMES)}, got {process!r}")
        return getattr(_processes, PROCESS_NAMES[process.lower()])()
    if not hasattr(process, "cache_key"):
        raise TypeError(f"process must be a name or a fastint process, got {type(process).__name__}")
    return process


def make_model(arch, sde, data_channels=1, **overrides):
    """A fresh denoiser for `sde` on data with `data_channels` channels (in = out = dim * C)."""
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(ARCH_DEFAULTS)}, got {arch!r}")
    cfg = dict(ARCH_DEFAULTS[arch])
    cfg.update(overrides)
    cls = ContinuousUNet if arch == "cunet" else UNet
    return cls(in_channels=sde.dim * data_channels, **cfg)


def sample_times(n, t_min, T, generator=None, device=None):
    """Stratified uniform times on [t_min, T]: one per stratum, randomly shifted."""
    u = (torch.rand((), generator=generator) + torch.arange(n, dtype=torch.float64) / n) % 1.0
    return (t_min + (T - t_min) * u).to(device=device)


def noise_state(sde, x0, t, eps):
    """z_t = Ψ(t,0)(x_0, 0) + L_t ε for data x0 [B, C, ...], times t [B] and ε of the state's shape."""
    z0 = x0 if sde.dim == 1 else torch.cat([x0, torch.zeros_like(x0)], dim=1)
    if eps.shape != z0.shape:
        raise ValueError(f"eps must have the state's shape {tuple(z0.shape)}, got {tuple(eps.shape)}")
    return sde.apply(sde.transition(t), z0) + sde.apply(sde.cholesky(t), eps)


def diffusion_loss(model, sde, x0, generator=None, t_min=1e-3):
    """Mean squared ε error at stratified times (ε-prediction for VP, hybrid score matching for PSLD/CLD)."""
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2:
        raise ValueError("x0 must be a data batch tensor [B, C, ...]")
    t = sample_times(x0.shape[0], t_min, sde.T, generator).to(x0.device)
    shape = (x0.shape[0], sde.dim * x0.shape[1]) + tuple(x0.shape[2:])
    eps = torch.randn(shape, generator=generator, dtype=x0.dtype).to(x0.device)
    z = noise_state(sde, x0, t, eps)
    return F.mse_loss(model(z, t.to(x0.dtype)), eps)


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up
    decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay=0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay, self.n = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1.0 + self.n) / (10.0 + self.n))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(p, 1.0 - d)
            else:
                e.copy_(p)


def _bar(total, enabled, desc, initial=0):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False)


def _lr_lambda(warmup):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def _check_resume(state, resume, process, arch, steps, given, model_overrides):
    """ValueError when an argument given with ``resume`` contradicts the checkpoint ``state``:
    resuming continues that run (its process, architecture and training config), so a different
    value would be silently ignored; ``steps`` (the new total) must exceed the steps done."""
    done = int(state["meta"]["step"])
    if steps <= done:
        raise ValueError(f"steps must exceed the {done} steps already done in {str(resume)!r} (it is the new total), "
                         f"got {steps}")
    saved_proc = type(load_checkpoint(state)[1]).__name__
    if process is not None:
        name = PROCESS_NAMES.get(process.lower(), process) if isinstance(process, str) else type(process).__name__
        if name != saved_proc:
            raise ValueError(f"process {process!r} differs from the resumed checkpoint's {saved_proc}; "
                             "resuming continues its run (drop --process, or train a new one)")
    saved_arch = "cunet" if state["arch"] == "ContinuousUNet" else "unet"
    if arch is not None and arch != saved_arch:
        raise ValueError(f"arch {arch!r} differs from the resumed checkpoint's {saved_arch!r}")
    saved = state["meta"]["train_config"]
    for k, v in given.items():
        if v is not None and k in saved and v != saved[k]:
            raise ValueError(f"{k}={v!r} differs from the resumed run's {k}={saved[k]!r}; resuming keeps its "
                             "training config")
    for k, v in (model_overrides or {}).items():
        have = state["config"].get(k)
        if have is not None and (tuple(v) if isinstance(v, (list, tuple)) else v) != \
                (tuple(have) if isinstance(have, (list, tuple)) else have):
            raise ValueError(f"model option {k}={v!r} differs from the resumed model's {k}={have!r}")


def train_denoiser(process=None, arch=None, steps=None, batch=None, lr=None, warmup=None, ema=None,
                   t_min=None, seed=None, out=None, resume=None, ship=None, ckpt_every=500, progress=True,
                   log=print, model_overrides=None, data=None):
    """Train a denoiser on the digits' train split; returns (ema_model, sde, history).

    process (default "psld") and arch (default "cunet"): of a new run. out: path of the
    resumable training checkpoint (written every `ckpt_every` steps and at the end); resume: a
    path written by `out` to continue from. Resuming keeps that run's process, architecture and
    training config: a differing value raises ValueError, as does a `steps` (the new total)
    that does not exceed the steps done. ship: path of a weights-only float16 copy of the EMA
    model. history: list of (step, loss) every 50 steps.
    """
    cfg = dict(TRAIN_DEFAULTS)
    cfg.update({k: v for k, v in dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, t_min=t_min,
                                      seed=seed).items() if v is not None})
    for k in ("steps", "batch", "warmup", "seed"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < (0 if k in ("warmup", "seed") else 1):
            raise ValueError(f"{k} must be a {'non-negative' if k in ('warmup', 'seed') else 'positive'} int, "
                             f"got {cfg[k]!r}")
    start, hist = 0, []
    if resume is not None:
        state = load_checkpoint(resume)[2]
        if "model_state" not in state:
            raise ValueError(f"{resume!r} is not a resumable training checkpoint (no optimizer state)")
        _check_resume(state, resume, process, arch, cfg["steps"], dict(batch=batch, lr=lr, warmup=warmup, ema=ema,
                                                                t_min=t_min, seed=seed), model_overrides)
        sde = load_checkpoint(state)[1]
        model = build_model(state, "model_state").train()
        arch = "cunet" if state["arch"] == "ContinuousUNet" else "unet"
        saved = state["meta"]["train_config"]
        cfg.update({k: v for k, v in saved.items() if k != "steps"})
        start, hist = int(state["meta"]["step"]), [tuple(h) for h in state["meta"]["history"]]
    x_train = load_digits("train")[0] if data is None else data
    if resume is None:
        sde = make_process("psld" if process is None else process)
        arch = "cunet" if arch is None else arch
        torch.manual_seed(cfg["seed"])
        model = make_model(arch, sde, x_train.shape[1], **(model_overrides or {})).train()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"]))
    ema_ = EMA(model, cfg["ema"])
    if resume is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema_.model.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})
        ema_.n = int(state["meta"]["ema_n"])
        g.set_state(state["rng"])

    def checkpoint(path, step, seconds):
        meta = dict(step=step, ema_n=ema_.n, history=[list(h) for h in hist], train_config=cfg,
                    seconds=seconds, arch_key=arch)
        save_checkpoint(path, ema_.model, sde, DATA_SHAPE, meta=meta, model_state=model.state_dict(),
                        optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=g.get_state())

    t0 = time.perf_counter()
    spent = float(state["meta"]["seconds"]) if resume is not None else 0.0
    bar = _bar(cfg["steps"], progress, f"train {arch} {type(sde).__name__}", initial=start)
    running = None
    for step in range(start, cfg["steps"]):
        idx = torch.randint(0, len(x_train), (cfg["batch"],), generator=g)
        loss = diffusion_loss(model, sde, x_train[idx], generator=g, t_min=cfg["t_min"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_.update(model)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            hist.append((step + 1, running))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
        if out is not None and ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < cfg["steps"]:
            checkpoint(out, step + 1, spent + time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    seconds = spent + time.perf_counter() - t0
    if out is not None:
        checkpoint(out, cfg["steps"], seconds)
    if ship is not None:
        meta = dict(steps=cfg["steps"], train_config=cfg, seconds=round(seconds, 1),
                    final_loss=None if running is None else round(running, 5), dataset="sklearn digits, train split")
        save_checkpoint(ship, ema_.model, sde, DATA_SHAPE, meta=meta, half=True)
    if log is not None:
        log(f"trained {arch} for {type(sde).__name__}: {cfg['steps']} steps, batch {cfg['batch']}, "
            f"{seconds:.0f} s, final loss {running if running is not None else float('nan'):.4f}")
    return ema_.model, sde, hist


def train_classifier(steps=1500, batch=128, lr=2e-3, seed=0, noise=0.1, out=None, progress=True, log=print):
    """Train the digit classifier on the train split (with small Gaussian input noise and ±1 pixel
    shifts as augmentation); returns (model, held-out accuracy). out: float16 checkpoint path."""
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = DigitClassifier().train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = _bar(steps, progress, "train classifier")
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        xb = xb + noise * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    seconds = time.perf_counter() - t0
    if out is not None:
        meta = dict(steps=steps, batch=batch, lr=lr, seed=seed, noise=noise, test_accuracy=round(acc, 4),
                    seconds=round(seconds, 1), dataset="sklearn digits, train split")
        save_checkpoint(out, model, None, DATA_SHAPE, meta=meta, half=True)
    if log is not None:
        log(f"trained classifier: {steps} steps, {seconds:.0f} s, held-out accuracy {acc:.4f}")
    return model, acc


def ship_checkpoint(training_checkpoint, out):
    """Write the float16 weights-only copy of a training checkpoint's EMA model to `out`."""
    ck = load_checkpoint(training_checkpoint)[2]
    model, sde = load_checkpoint(ck)[:2]
    meta = {k: ck["meta"][k] for k in ("step", "train_config", "seconds") if k in ck["meta"]}
    save_checkpoint(out, model, sde, tuple(ck["data"]["shape"]), meta=meta, half=True)
    return out


# --------------------------------------------------------------------------- command line
def _ints(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}")


def add_arguments(p):
    """The options of `fastint train`."""
    p.add_argument("--arch", default=None, choices=("cunet", "unet", "classifier"),
                   help="cunet (ContinuousUNet, default), unet (DDPM U-Net) or classifier (the metric's CNN)")
    p.add_argument("--process", default=None, choices=sorted(PROCESS_NAMES), help="diffusion (default psld)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {TRAIN_DEFAULTS['steps']}; "
                   "classifier 1500); with --resume, the new total")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {TRAIN_DEFAULTS['batch']})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {TRAIN_DEFAULTS['lr']})")
    p.add_argument("--ema", type=float, default=None, help=f"EMA decay (default {TRAIN_DEFAULTS['ema']})")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--ch", type=int, default=None, help="model width (default 32)")
    p.add_argument("--ch-mult", default=None, help="comma-separated width multipliers per level (default 1,2)")
    p.add_argument("--ode-steps", type=int, default=None, help="cunet: RK4 steps per ODE block (default 1)")
    p.add_argument("--out", default=None, help="resumable training checkpoint (written every 500 steps and at the end)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint written by --out (its process, "
                   "architecture and training config; --steps is the new total)")
    p.add_argument("--ship", default=None, help="also write a small float16 weights-only checkpoint here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_from_args(args, error):
    """Run `fastint train` from parsed arguments; `error(msg)` reports a usage error."""
    if args.out is None and args.ship is None:
        error("give --out and/or --ship: otherwise the trained model is not saved")
    if args.arch == "classifier" and (args.resume is not None or args.process is not None):
        error("--arch classifier takes neither --resume nor --process")
    from .cli import check_output_file
    for flag, path in (("--out", args.out), ("--ship", args.ship)):  # before training, not after it
        if path is not None:
            check_output_file(flag, path, error)
    try:
        if args.arch == "classifier":
            kw = {k: v for k, v in dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed).items()
                  if v is not None}
            train_classifier(out=args.ship or args.out, progress=not args.no_progress, **kw)
            return 0
        overrides = {k: v for k, v in dict(ch=args.ch, ode_steps=args.ode_steps).items() if v is not None}
        if args.ch_mult is not None:
            overrides["ch_mult"] = _ints(args.ch_mult)
        if args.arch == "unet":
            overrides.pop("ode_steps", None)
        train_denoiser(args.process, args.arch, steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema,
                       seed=args.seed, out=args.out, resume=args.resume, ship=args.ship,
                       progress=not args.no_progress, model_overrides=overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        error(str(e))
    return 0
