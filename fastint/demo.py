"""`fastint demo`: the shipped digit denoiser (default) and the analytic-mixture table (`--toy`).

`run_image_demo`: the shipped PSLD ContinuousUNet (fastint/checkpoints) samples 8x8 digits
with the recommended sampler and with `euler` at the same small NFE, from the same prior
draws; prints the Fréchet distance of each sample set to the 1797 real digits (classifier
features and raw pixels) and the wall time, and writes a PNG grid of the recommended
sampler's digits. The PNG writer is a few lines of zlib + struct: no imaging library.

`compare_with_peers`: the same digits task on the shipped VP model, fastint's recommended
VP sampler and its drop-in diffusers scheduler against diffusers' best multistep schedulers
(DPM-Solver++ 2M, UniPC bh2) at the same NFE on the same draws (diffusers has no PSLD
scheduler, so the peers need the VP model); the demo prints it after the PSLD table.

`run_demo` (`fastint demo --toy`): every implemented method on the built-in analytic mixture.
For each process the same prior draws are integrated by every method at several NFEs.
Deterministic methods are scored by their endpoint error against scipy's DOP853 solution
of the exact PF-ODE (denoised with the same exact Tweedie step); every method is also
scored by the sliced W2 distance of its samples to exact data draws.
"""
import struct
import time
import zlib

import torch

from .coefficients import METHODS
from .metrics import sliced_wasserstein
from .models import GaussianMixture, reference_solution, tweedie_reference
from .processes import CLD, PSLD, VPSDE
from .sampler import Sampler
from .table import _progress

PROCESSES = {"vp": VPSDE, "psld": PSLD, "cld": CLD}


def diverged(err, sw2, scale):
    """A row whose endpoint error or SW2 is not finite or exceeds ``scale`` (the RMS norm of the
    data): its samples are no closer to the data than the origin is, so it has blown up."""
    vals = [v for v in (err, sw2) if v is not None]
    return any(not v == v or v in (float("inf"), float("-inf")) or v > scale for v in vals)


def run_demo(processes=("vp", "psld", "cld"), nfes=(10, 20, 50, 100), batch=512, seed=0, grid="quadratic",
             progress=True, out=print):
    """The analytic-mixture table; returns rows (process, method, nfe, err, sw2, wall_s). A method
    with several calls per step runs at the largest NFE it can reach exactly (fit_nfe), and the
    table says so; rows that blew up (`diverged`) are marked."""
    rows = []
    jobs = [(p, m, fit_nfe(m, n)) for p in processes for m in METHODS for n in nfes
            if (not METHODS[m].vp_only or p == "vp") and (not getattr(METHODS[m], "aug_only", False) or p != "vp")]
    jobs = list(dict.fromkeys(jobs))  # a method with several calls per step may round two NFEs alike
    adjusted = {m: {n: fit_nfe(m, n) for n in nfes if fit_nfe(m, n) != n} for m in dict.fromkeys(j[1] for j in jobs)}
    adjusted = {m: a for m, a in adjusted.items() if a}  # method -> {requested NFE: NFE run}
    refs = {}
    for name in processes:
        sde = PROCESSES[name]()
        model = GaussianMixture.default(sde)
        g = torch.Generator().manual_seed(seed)
        zT = sde.prior_sample((batch, *model.data_shape), generator=g, dtype=torch.float64)
        z_ref = reference_solution(model, sde, zT)
        x_ref = sde.data_part(tweedie_reference(model, sde, z_ref, 1e-3))
        data = model.sample_data(batch, generator=torch.Generator().manual_seed(seed + 1))
        refs[name] = (sde, model, zT, x_ref, data)
    for name, method, nfe in _progress(jobs, progress, "demo"):
        sde, model, zT, x_ref, data = refs[name]
        sampler = Sampler(sde, method=method, nfe=nfe, grid=grid)
        t0 = time.perf_counter()
        x = sampler.sample(model, zT.float(), generator=torch.Generator().manual_seed(seed + 2))
        wall = time.perf_counter() - t0
        err = None
        if not METHODS[method].stochastic:
            err = float((x.double() - x_ref).flatten(1).norm(dim=1).mean())
        sw2 = sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(seed + 3))
        rows.append((name, method, nfe, err, sw2, wall))
    ref_sw2 = {n: sliced_wasserstein(refs[n][3], refs[n][4], generator=torch.Generator().manual_seed(seed + 3))
               for n in processes}
    scale = {n: float(refs[n][4].double().flatten(1).pow(2).sum(1).mean().sqrt()) for n in processes}
    out(f"fastint demo: 8-mode Gaussian mixture in 2-D, {batch} samples, grid={grid}, t_eps=1e-3, denoise=True")
    out("err = mean |x - x_ref| against the DOP853 (rtol 1e-10) PF-ODE solution; SW2 = sliced W2 to exact data draws")
    out(f"{'process':8} {'method':11} {'NFE':>4} {'err':>10} {'SW2':>8} {'wall ms':>8}")
    n_div = 0
    for name, method, nfe, err, sw2, wall in rows:
        e = "—" if err is None else f"{err:.2e}"
        bad = diverged(err, sw2, scale[name])
        n_div += bad
        mark = ("  *" if nfe not in nfes else "") + ("  <- diverged" if bad else "")
        out(f"{name:8} {method:11} {nfe:>4} {e:>10} {sw2:>8.4f} {wall * 1e3:>8.1f}{mark}")
    for n in processes:
        out(f"{n:8} {'DOP853':11} {'':>4} {'0':>10} {ref_sw2[n]:>8.4f}   (reference; SW2 floor from {batch} samples)")
    if adjusted:
        out("* NFE adjusted: a method with c model calls per step runs whole steps plus the denoising call, at the "
            "largest such NFE <= the one asked (one step plus the denoising call where the one asked is "
            "smaller): " + "; ".join(
                f"{m} ({METHODS[m].calls_per_step}/step) " + ", ".join(f"{a}->{b}" for a, b in adj.items())
                for m, adj in adjusted.items()))
    if n_div:
        out(f"{n_div} rows diverged: err or SW2 above the data's RMS norm "
            f"({', '.join(f'{n} {scale[n]:.2f}' for n in processes)}), or not finite")
    return rows


# --------------------------------------------------------------------------- the VP peers
# The VP sampler the README recommends (chosen by FD on this model, docs/results.md): data
# prediction interpolated in log-SNR with the inner corrector, the last n of n + 1 uniform times
# from t = 1 down to t = 0.1 (grid="leading": the model is not called at t = 1; 0.1 is where x̂0
# of this model's samples scores best), then the denoising call to x̂0. Below ORDER3_BELOW calls,
# the third-order predictor without the corrector (docs/dropin.md, "Order by step count").
ORDER3_BELOW = 11
RECOMMENDED_VP = dict(method="conj_ms", grid="leading", t_eps=0.1, denoise=True, k=2, predict="x0",
                      interp="logsnr", corrector="inner", k3_below=ORDER3_BELOW)
# The drop-in the docs recommend for learned VP models (docs/dropin.md, "Ahead of the peers"): the
# same frame, corrector and times (its own spacing: the last n of n + 1 uniform timesteps from 999
# down to 99, t = 0.1), then x̂0. ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN).
RECOMMENDED_DROPIN = dict(predict="x0", interp="logsnr", final_step="x0", corrector=True, last_timestep=99,
                          order3_below=ORDER3_BELOW)
PEERS = (("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
         ("UniPC bh2", "UniPCMultistepScheduler", {"solver_type": "bh2"}))


def diffusers_config(sde, n=1000):
    """A diffusers scheduler config whose alphas_cumprod[k] is sde's ᾱ at t = (k + 1)/n."""
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    ab = sde.alpha(t) ** 2
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return dict(num_train_timesteps=n, trained_betas=betas.tolist(), timestep_spacing="trailing",
                prediction_type="epsilon")


def _diffusers_loop(scheduler, model, zT, nfe, n=1000):
    """The standard diffusers loop around a continuous-time VP ε-model (timestep k -> t = (k+1)/n)."""
    scheduler.set_timesteps(nfe)
    x = zT * scheduler.init_noise_sigma
    for k in scheduler.timesteps:
        t = torch.full((x.shape[0],), (float(k) + 1) / n)
        x = scheduler.step(model(scheduler.scale_model_input(x, k), t), k, x).prev_sample
    return x


@torch.no_grad()
def compare_with_peers(checkpoint="vp", nfe=20, n_samples=500, seed=0, log=print, progress=False):
    """FD at ``nfe`` calls of fastint's recommended VP Sampler, its recommended drop-in, its
    ConjugateMultistepScheduler with defaults ('trailing', the config's) and diffusers'
    DPM-Solver++ 2M and UniPC bh2 ('trailing'), same prior draws; returns the rows, or
    [] when diffusers is not installed. ``progress``: a bar over the samplers."""
    try:
        import diffusers
    except ImportError:
        log("(diffusers is not installed: no peer comparison; pip install fastint[diffusers])")
        return []
    from .data import load_digits
    from .diffusers import ConjugateMultistepScheduler
    from .metrics import frechet_distance
    from .models.checkpoint import load_checkpoint

    model, sde, ckpt = load_checkpoint(checkpoint)
    if not isinstance(sde, VPSDE):
        raise ValueError(f"the peer comparison needs a VP checkpoint, got {type(sde).__name__}")
    reference = load_digits("all")[0]
    zT = torch.randn((n_samples, *tuple(ckpt["data"]["shape"])), generator=torch.Generator().manual_seed(seed))
    cfg = diffusers_config(sde)
    runs = [("fastint Sampler (recommended)", lambda: Sampler(sde, nfe=nfe, **RECOMMENDED_VP).sample(model, zT)),
            ("fastint drop-in (recommended)",
             lambda: _diffusers_loop(ConjugateMultistepScheduler.from_config(cfg, **RECOMMENDED_DROPIN), model, zT,
                                     nfe)),
            ("fastint drop-in (defaults)",
             lambda: _diffusers_loop(ConjugateMultistepScheduler.from_config(cfg), model, zT, nfe))]
    for label, cls, kw in PEERS:
        runs.append((label, lambda cls=cls, kw=kw: _diffusers_loop(getattr(diffusers, cls).from_config(cfg, **kw),
                                                                   model, zT, nfe)))
    fd = lambda x: frechet_distance(x, reference) if torch.isfinite(x).all() else float("inf")  # noqa: E731
    return _peer_table(runs, nfe, {"fd": (fd, "8.3f")}, "fd", log,
                       f"VP digits model ({checkpoint}), {n_samples} samples, NFE {nfe}, same prior draws; diffusers "
                       "peers on 'trailing' timesteps (diffusers has no PSLD scheduler):", progress)


def _peer_table(runs, nfe, metrics, rank, log, title, progress=False):
    """Time each (label, fn() -> samples) of ``runs``, score it with ``metrics`` (name -> (fn(x) ->
    float, format)), print the rows with the best diffusers peer by ``rank`` marked; the rows."""
    rows = []
    for label, fn in _progress(runs, progress, "peers"):
        t0 = time.perf_counter()
        x = fn()
        rows.append(dict(method=label, nfe=nfe, wall_s=time.perf_counter() - t0,
                         **{name: f(x) for name, (f, _) in metrics.items()}))
    best = min((r for r in rows if not r["method"].startswith("fastint")), key=lambda r: r[rank])
    log(title)
    log(f"{'sampler':38} {'NFE':>4} " + " ".join(f"{'FD' if n == 'fd' else n:>8}" for n in metrics) + f" {'wall s':>8}")
    for r in rows:
        mark = "  <- best diffusers peer" if r is best else ""
        log(f"{r['method']:38} {r['nfe']:>4} " + " ".join(f"{r[n]:{fmt}}" for n, (_, fmt) in metrics.items())
            + f" {r['wall_s']:>8.2f}{mark}")
    return rows


def _flow_loop(scheduler, model, zT, nfe):
    """The standard diffusers loop around a velocity model called with each step's sigma."""
    scheduler.set_timesteps(nfe)
    x = zT.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, scheduler.sigmas[i].float().expand(x.shape[0])), t, x).prev_sample
    return x


FLOW_PEERS = (("FlowMatch Euler", "FlowMatchEulerDiscreteScheduler", {}),
              ("DPM-Solver++ 2M (flow sigmas)", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
              ("UniPC bh2 (flow sigmas)", "UniPCMultistepScheduler", {"solver_type": "bh2"}))


@torch.no_grad()
def compare_flow_with_peers(nfe=10, n_samples=500, seed=0, shift=3.0, log=print, progress=False):
    """The shipped digits flow model (load_pretrained("flow")) sampled at ``nfe`` calls by
    fastint's FlowMatchConjugateScheduler and diffusers' FlowMatch Euler, DPM-Solver++ 2M and
    UniPC bh2 (flow sigmas), each on its own sigmas, same prior draws. Accuracy is the RMS
    distance to a near-converged solution from the same draws (fastint, order 3, 50 calls; its
    own error is a few % of the distances shown), since FD cannot resolve these differences at 500 samples
    (docs/results.md, "Flow matching"). Returns the rows, or [] without diffusers."""
    try:
        import diffusers
    except ImportError:
        log("(diffusers is not installed: no flow comparison; pip install fastint[diffusers])")
        return []
    from .data import load_digits
    from .diffusers import FlowMatchConjugateScheduler
    from .metrics import frechet_distance
    from .models.checkpoint import load_pretrained

    model = load_pretrained("flow").model
    reference = load_digits("all")[0]
    zT = torch.randn((n_samples, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift).config
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    converged = _flow_loop(FlowMatchConjugateScheduler.from_config(base, solver_order=3), model, zT, 50)
    runs = [("fastint FlowMatchConjugateScheduler", lambda: FlowMatchConjugateScheduler.from_config(base))]
    for label, cls, kw in FLOW_PEERS:  # FlowMatch classes from the base config; UniPC / DPM built for flow
        runs.append((label, (lambda cls=cls: getattr(diffusers, cls).from_config(base)) if cls.startswith("FlowMatch")
                     else (lambda cls=cls, kw=kw: getattr(diffusers, cls)(**flow, **kw))))
    rms = lambda x: float((x - converged).pow(2).mean().sqrt())  # noqa: E731
    fd = lambda x: frechet_distance(x, reference) if torch.isfinite(x).all() else float("inf")  # noqa: E731
    return _peer_table([(label, lambda make=make: _flow_loop(make(), model, zT, nfe)) for label, make in runs], nfe,
                       {"rms": (rms, "8.4f"), "fd": (fd, "8.3f")}, "rms", log,
                       f"Flow-matching digits model (flow, shift {shift:g}), {n_samples} samples, NFE {nfe}, same prior "
                       "draws, each scheduler on its own sigmas; rms = distance to a converged solution:", progress)


# --------------------------------------------------------------------------- the image demo
# The sampler the demo recommends for PSLD: the first of these that fastint.METHODS has.
RECOMMENDED = ("cspsd", "lambda_ddim")


def recommended_method(methods=None):
    """The first name of RECOMMENDED present in `methods` (default fastint.METHODS)."""
    methods = METHODS if methods is None else methods
    for name in RECOMMENDED:
        if name in methods:
            return name
    raise LookupError(f"none of {RECOMMENDED} is an available method")


def fit_nfe(method, nfe, denoise=True):
    """The largest NFE <= nfe that `method` can run exactly (whole steps plus the denoising call),
    or its smallest, one step plus the denoising call, when nfe is below that."""
    per = METHODS[method].calls_per_step
    steps = max(1, (nfe - int(denoise)) // per)
    return steps * per + int(denoise)


def write_png(path, image):
    """Write a uint8 grayscale image [H, W] as an 8-bit PNG (zlib + struct, no dependencies)."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 2:
        raise ValueError("image must be a uint8 tensor [H, W]")
    h, w = image.shape
    raw = b"".join(b"\x00" + bytes(row) for row in image.tolist())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
    return path


def image_grid(x, rows, scale=4, pad=1):
    """Images [N, 1, H, W] in [-1, 1] -> one uint8 grid [rows*(H*scale+pad)+pad, ...] (nearest upscaling)."""
    from .data import to_uint8
    n, _, h, w = x.shape
    cols = -(-n // rows)
    img = torch.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad), 255, dtype=torch.uint8)
    tiles = to_uint8(x[:, 0]).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        img[y0:y0 + h * scale, x0:x0 + w * scale] = tiles[i]
    return img


def run_image_demo(checkpoint="psld", nfe=20, n_samples=500, method=None, out_png="fastint_demo.png",
                   grid_rows=10, seed=0, log=print, progress=False):
    """Sample the shipped denoiser with `method` and euler at `nfe`; log the Fréchet distances
    and wall times, write a PNG grid; returns a list of dict rows. Unset `method`: the
    recommended sampler, `recommended_method()` on PSLD/CLD and RECOMMENDED_VP (with its grid
    and final time) on VP. `progress`: a bar per sampling run."""
    from .data import load_digits
    from .metrics import frechet_distance
    from .models.checkpoint import load_checkpoint

    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an int >= 2, got {nfe!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    model, sde, ckpt = load_checkpoint(checkpoint)
    if sde is None:
        raise ValueError(f"checkpoint {checkpoint!r} is not a denoiser")
    settings = {}
    if method is None and sde.dim == 1:
        settings = {k: v for k, v in RECOMMENDED_VP.items() if k != "method"}
        method = RECOMMENDED_VP["method"]
    method = recommended_method() if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    data_shape = tuple(ckpt["data"]["shape"])
    reference = load_digits("all")[0]
    zT = sde.prior_sample((n_samples, *data_shape), generator=torch.Generator().manual_seed(seed))
    rows = []
    for name in dict.fromkeys([method, "euler"]):
        kw = settings if name == method else {}
        k = fit_nfe(name, nfe, kw.get("denoise", True))
        sampler = Sampler(sde, method=name, nfe=k, **kw)
        t0 = time.perf_counter()
        x = sampler.sample(model, zT, generator=torch.Generator().manual_seed(seed + 1), progress=progress)
        wall = time.perf_counter() - t0
        rows.append(dict(method=name, nfe=k, wall_s=wall, x=x, fd=frechet_distance(x, reference),
                         fd_pixels=frechet_distance(x, reference, features="pixels")))
    floor = load_digits("test")[0]
    arch = ckpt["arch"]
    log(f"fastint demo: {arch} ({sum(p.numel() for p in model.parameters()):,} parameters) trained on 8x8 digits, "
        f"{type(sde).__name__}; {n_samples} samples from the same prior draws")
    log("FD = Fréchet distance to the 1797 real digits on the shipped classifier's features (FD px: on pixels)")
    log(f"{'method':12} {'NFE':>4} {'FD':>8} {'FD px':>8} {'wall s':>8}")
    for r in rows:
        log(f"{r['method']:12} {r['nfe']:>4} {r['fd']:>8.3f} {r['fd_pixels']:>8.3f} {r['wall_s']:>8.2f}")
    log(f"{'real digits':12} {'':>4} {frechet_distance(floor, reference):>8.3f} "
        f"{frechet_distance(floor, reference, features='pixels'):>8.3f}   (the {len(floor)} held-out digits: the floor)")
    if out_png:
        n_show = min(len(rows[0]["x"]), grid_rows * grid_rows)
        write_png(out_png, image_grid(rows[0]["x"][:n_show], grid_rows))
        log(f"wrote {out_png}: {n_show} digits sampled by {rows[0]['method']} at NFE {rows[0]['nfe']}")
    return rows
