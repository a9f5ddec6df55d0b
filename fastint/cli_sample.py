"""`fastint sample`: draw samples with any method from a checkpoint or the analytic mixture."""
from __future__ import annotations

import argparse
import os
import time

import torch

PROCESSES = ("vp", "psld", "cld")


def _option(text):
    """`name=value` -> (name, bool | int | float | str): True / False (any case) are bools, as
    `fastint methods` lists the bool options."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    name, value = text.split("=", 1)
    if value.strip().lower() in ("true", "false"):
        return name.strip(), value.strip().lower() == "true"
    for conv in (int, float):
        try:
            return name.strip(), conv(value)
        except ValueError:
            pass
    return name.strip(), value.strip()


def shipped_denoisers():
    """The names of the shipped checkpoints `--checkpoint` takes: every one of
    fastint.models.checkpoint.PRETRAINED but the digit classifier (a classifier, no denoiser)."""
    from .models.checkpoint import PRETRAINED
    return [name for name, file in PRETRAINED.items() if not file.startswith("classifier")]


def grid_names():
    """The named time grids `--grid` takes: fastint.grids.GRIDS (diffusion processes), then any
    only a flow-matching checkpoint's FlowMatch takes (fastint.flow.FLOW_GRIDS)."""
    from .flow import FLOW_GRIDS
    from .grids import GRIDS
    return list(dict.fromkeys([*GRIDS, *FLOW_GRIDS]))


def add_arguments(p):
    p.add_argument("--checkpoint", default=None,
                   help=f"denoiser checkpoint: a path or a shipped name (one of: {', '.join(shipped_denoisers())}); "
                   "default: the analytic mixture")
    p.add_argument("--process", default=None, choices=PROCESSES, help="process of the analytic mixture (default vp)")
    p.add_argument("--dim", type=int, default=None, help="data dimension of the analytic mixture (default 2)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow-matching checkpoints (flow): the sigma shift of the named grids (default 1)")
    p.add_argument("--method", default="ddim", help="integrator (see `fastint methods`; default ddim)")
    p.add_argument("--nfe", type=int, default=20, help="model calls per sample (default 20)")
    p.add_argument("--grid", default="quadratic",
                   help=f"time grid, one of: {', '.join(grid_names())} (default quadratic)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE",
                   help="a method option, repeatable: e.g. --option lam=0.5 --option b=ones, --option k=3")
    p.add_argument("--batch", type=int, default=None, help="--out: number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed: sample i depends only on (seed, i), whatever the batching (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; under torchrun, cuda means one GPU "
                   "per rank, LOCAL_RANK)")
    p.add_argument("--out", default=None, help="output: .npz (samples and settings) or .png (default samples.npz)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="sharded output: .npz shards (index, samples) and a manifest in DIR; resumable, and shared "
                   "by the ranks under torchrun (needs --num-samples)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="--out-dir: number of samples")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="--out-dir: samples per model batch and per shard (default 64)")
    p.add_argument("--fd", action="store_true",
                   help="--out-dir: print the Fréchet distance of the finished set to the real digits "
                   "(classifier features; digit checkpoints only), reduced across ranks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_and_process(args, error):
    """(model, process, data shape, description) from --checkpoint, or the analytic mixture of
    --process and --dim (None: vp, 2). --process / --dim set with --checkpoint are refused: the
    checkpoint fixes both, so they would be ignored."""
    import fastint

    process = "vp" if args.process is None else args.process
    dim = 2 if args.dim is None else args.dim
    if args.checkpoint is None:
        from .models import GaussianMixture
        if args.shift is not None:
            error("--shift is for flow-matching checkpoints (--checkpoint flow)")
        if dim < 1:
            error("--dim must be >= 1")
        sde = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}[process]()
        model = GaussianMixture.default(sde, dim=dim)
        return model, sde, tuple(model.data_shape), f"analytic mixture ({dim}-D, {type(sde).__name__})"
    given = [f"{flag} {value}" for flag, value in (("--process", args.process), ("--dim", args.dim))
             if value is not None]
    if given:
        error(f"{' and '.join(given)} would be ignored with --checkpoint (the checkpoint fixes the process and the "
              "data shape); drop them")
    loader = getattr(fastint.models, "load_checkpoint", None)
    if loader is None:
        error("--checkpoint needs fastint.models.load_checkpoint, which this build does not have")
    try:
        model, sde, ckpt = loader(args.checkpoint, map_location=args.device)
    except (OSError, ValueError, TypeError, KeyError) as e:
        error(f"--checkpoint {args.checkpoint!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except Exception as e:  # random bytes, a truncated or empty file: torch.load's many failure modes
        error(f"--checkpoint {args.checkpoint!r} is not a readable checkpoint file "
              f"({type(e).__name__}{': ' + str(e).splitlines()[0].split('. ')[0] if str(e) else ''})")
    if sde is None and ckpt.get("prediction") == "flow" and ckpt.get("data") is not None:
        try:  # a velocity model: x_σ = (1 − σ) x0 + σ ε
            sde = fastint.FlowMatch(shift=1.0 if args.shift is None else args.shift)
        except (ValueError, TypeError) as e:
            error(f"--shift: {e}")
    if sde is None or ckpt.get("data") is None:
        error(f"--checkpoint {args.checkpoint!r} holds no denoiser (a classifier?)")
    if args.shift is not None and not isinstance(sde, fastint.FlowMatch):
        error("--shift is for flow-matching checkpoints; this one is a " + type(sde).__name__)
    return model, sde, tuple(ckpt["data"]["shape"]), f"{ckpt.get('arch')} from {args.checkpoint} ({type(sde).__name__})"


def sampler_message(e, args):
    """The text of fastint.Sampler's ValueError / TypeError for ``args`` as `fastint sample` spells it:
    the flag (--nfe, --method, --grid, --option NAME) in place of the keyword argument, and the
    refused text of --option NAME=TEXT."""
    import re

    from .cli import SAMPLE_RENAMES, flag_message

    text = " ".join(str(e).splitlines())
    m = re.match(r"method '(\w+)' takes (?:no options, got|options \[(.*?)\], got unknown) \[(.*)\]$", text)
    if m:  # name the refused --option(s), then what the method takes
        unknown = ", ".join(v.strip(" '") for v in m.group(3).split(","))
        takes = "no options" if m.group(2) is None else f"options [{m.group(2)}]"
        return f"--option {unknown}: method {m.group(1)!r} takes {takes} (see `fastint methods`)"
    m = re.match(r"option (\w+) must be ", text)
    if m:
        name, options = m.group(1), dict(args.option)
        if text.endswith(", got str") and isinstance(options.get(name), str):
            text = text.removesuffix("str") + repr(options[name])
    return flag_message(text, SAMPLE_RENAMES)


def scatter_png(x, size=256):
    """2-D points [N, 2] -> a uint8 image [size, size] (dark dots on white), axes from the data range."""
    pts = x.reshape(x.shape[0], -1)[:, :2].to(torch.float64)
    lo, hi = pts.min(0).values, pts.max(0).values
    span = (hi - lo).clamp(min=1e-12)
    ij = ((pts - lo) / span * (size - 5) + 2).round().long()
    img = torch.full((size, size), 255, dtype=torch.uint8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            img[(size - 1 - ij[:, 1] + dy).clamp(0, size - 1), (ij[:, 0] + dx).clamp(0, size - 1)] = 0
    return img


def _check_outputs(args, error):
    """Which output (--out or --out-dir) and its arguments, refused clearly when mixed."""
    if args.out_dir is not None:
        if args.out is not None or args.batch is not None:
            error("--out-dir writes shards: use --num-samples and --batch-size, not --out/--batch")
        if args.num_samples is None or args.num_samples < 1:
            error("--out-dir needs --num-samples N with N >= 1")
        args.batch_size = 64 if args.batch_size is None else args.batch_size
        if args.batch_size < 1:
            error("--batch-size must be >= 1")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            error(f"--out-dir {args.out_dir!r} exists and is not a directory")
        return
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size), ("--fd", args.fd)):
        if value not in (None, False):
            error(f"{flag} needs --out-dir (sharded output); with --out use --batch")
    args.out = "samples.npz" if args.out is None else args.out
    args.batch = 16 if args.batch is None else args.batch
    if args.batch < 1:
        error("--batch must be >= 1")
    if not (args.out.endswith(".npz") or args.out.endswith(".png")):
        error(f"--out must end in .npz or .png, got {args.out!r}")
    from .cli import check_output_file
    check_output_file("--out", args.out, error)


def main_from_args(args, error, log=print):
    """`fastint sample`; under torchrun (WORLD_SIZE > 1) with --out-dir every rank draws its share
    of the shards (fastint.distributed) and only rank 0 prints."""
    import fastint

    _check_outputs(args, error)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        error(f"--device: {e}")
    if device.type not in ("cpu", "cuda"):
        error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        error(f"--device {args.device!r}: this torch build has no usable CUDA device (torch.cuda.is_available() is False)")
    if not -(2**63) <= args.seed < 2**64:
        error(f"--seed must fit in 64 bits, got {args.seed}")
    if args.out_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        error("under torchrun, use --out-dir (each rank writes its shards), not --out")
    model, sde, data_shape, what = _model_and_process(args, error)
    try:
        sampler = fastint.Sampler(sde, method=args.method, nfe=args.nfe, grid=args.grid, **dict(args.option))
    except (ValueError, TypeError) as e:
        error(sampler_message(e, args))
    if args.fd and tuple(data_shape) != (1, 8, 8):
        error(f"--fd compares with the real 8x8 digits; this model's data shape is {tuple(data_shape)}")
    if args.out is not None and args.out.endswith(".png") and _png_kind(data_shape) is None:
        error(_PNG_ERROR)  # before any sampling
    if args.out_dir is not None:
        return _sharded(args, error, log, model, sde, sampler, data_shape, what, device)
    model = model.to(device) if hasattr(model, "to") else model
    from .seeding import philox_key, prior_draw
    zT = prior_draw(sde, data_shape, args.seed, 0, args.batch, device)
    t0 = time.perf_counter()
    try:
        x = sampler.sample(model, zT, seed=philox_key(args.seed), progress=not args.no_progress)
    except (FloatingPointError, ValueError) as e:  # never write non-finite samples; a table float32 cannot use
        error(str(e).removeprefix("fastint: "))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    x = x.float().cpu()
    log(f"fastint sample: {what}; {sampler!r}")
    log(f"{args.batch} samples of shape {tuple(data_shape)} in {wall:.3f} s; mean {float(x.mean()):.4f}, "
        f"std {float(x.std()):.4f}")
    _write(args, error, x, sde, what)
    log(f"wrote {args.out}")
    return 0


def _sharded(args, error, log, model, sde, sampler, data_shape, what, device):
    """--out-dir: the resumable sharded job, on every rank of the torchrun group if there is one."""
    import torch.distributed as dist

    from . import distributed

    device = distributed.init_from_env(device)
    rank, world = distributed.rank_and_world()
    if rank:
        log = lambda *a, **k: None  # noqa: E731  (rank 0 speaks for the job)
    model = model.to(device) if hasattr(model, "to") else model
    job = {"checkpoint": args.checkpoint, "method": args.method, "nfe": args.nfe, "grid": args.grid,
           "options": sorted([k, v] for k, v in args.option)}
    t0 = time.perf_counter()
    try:
        res = distributed.generate(model, sde, sampler, args.num_samples, args.batch_size, args.seed, args.out_dir,
                                   data_shape, device=device, job=job, progress=not args.no_progress)
        wall = time.perf_counter() - t0
        log(f"fastint sample: {what}; {sampler!r}; {world} process(es)")
        log(f"{res['written']} samples written in {wall:.3f} s ({res['skipped']} of {res['shards']} shards were "
            f"already done) in {args.out_dir}")
        if args.fd:
            from .data import load_digits
            fd = distributed.frechet_distance(args.out_dir, load_digits("all")[0], device=device)
            log(f"Fréchet distance to the real digits ({args.num_samples} samples, classifier features): {fd:.4f}")
    except (ValueError, FloatingPointError) as e:
        error(str(e).removeprefix("fastint: "))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _write(args, error, x, sde, what):
    import numpy as np

    from .demo import image_grid, write_png

    if args.out.endswith(".npz"):
        extra = {"shift": sde.shift} if hasattr(sde, "shift") else {}  # FlowMatch: it shapes the grid
        np.savez(args.out, x=x.numpy(), method=args.method, nfe=args.nfe, grid=args.grid, seed=args.seed,
                 process=type(sde).__name__, model=what, options=repr(dict(args.option)), **extra)
    else:
        kind = _png_kind(x.shape[1:])
        if kind == "grid":  # images [N, C, H, W]: a grid of the first channel
            img = image_grid(x.clamp(-1, 1)[:100], rows=max(1, min(10, int(len(x) ** 0.5))))
        elif kind == "scatter":
            img = scatter_png(x)
        else:
            error(_PNG_ERROR)
        write_png(args.out, img)


_PNG_ERROR = "--out .png needs images or data with at least 2 dimensions; use .npz"


def _png_kind(data_shape):
    """How a sample of ``data_shape`` is drawn as a PNG: 'grid' (images [C, H, W]), 'scatter' (the
    first two coordinates), or None (fewer than 2 numbers per sample)."""
    if len(data_shape) == 3 and data_shape[1] > 1:
        return "grid"
    n = 1
    for d in data_shape:
        n *= int(d)
    return "scatter" if n >= 2 else None
