"""Sample sets at scale: sharded, resumable generation on torch.distributed (docs/distributed.md).

A job of ``num_samples`` samples is cut into shards of ``batch_size`` consecutive indices; shard k
holds samples [k B, min((k + 1) B, N)) and is written to ``out_dir/shard-{k:06d}.npz`` (arrays
``index``, int64, and ``samples``) atomically: a temporary file, then a rename. A manifest
(``manifest.json``) records the job's arguments; a run with other arguments into the same
directory is refused, and a run with the same arguments draws only the shards that are missing.

Under torchrun (or any initialised process group) the missing shards are dealt round-robin to the
ranks; rank 0 shows one progress bar for the whole job. Samples depend only on (seed, index)
(fastint.seeding), so the set is the same for any world size, and a dead rank loses at most the
shard it was drawing.
"""
import glob
import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from .seeding import philox_key, prior_draw

MANIFEST = "manifest.json"
FORMAT = 1
_SHARD = "shard-{:06d}.npz"


# ---- the process group -------------------------------------------------------------------
def rank_and_world():
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device="cpu"):
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): gloo on CPU,
    NCCL with one GPU per rank (LOCAL_RANK) on CUDA. Returns the device this rank samples on.
    A no-op (the device unchanged) outside torchrun or when a group is already initialised."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _comm_device(device):
    """Where collectives' tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(obj):
    """rank 0's ``obj`` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(values, device):
    """Element-wise sum over ranks of a float64 tensor (identity without a process group)."""
    if not dist.is_initialized():
        return values
    t = values.to(_comm_device(device))
    dist.all_reduce(t)
    return t.cpu()


# ---- the job ------------------------------------------------------------------------------
def model_fingerprint(model):
    """A sha256 of an nn.Module's parameters and buffers (names, shapes, dtypes, bytes), so a
    manifest tells two models apart; the type name for any other callable."""
    if not isinstance(model, torch.nn.Module):
        return type(model).__qualname__
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _manifest(model, sde, sampler, num_samples, batch_size, seed, data_shape, job):
    return {"format": FORMAT, "num_samples": num_samples, "batch_size": batch_size, "seed": seed,
            "data_shape": list(data_shape), "process": repr(sde), "sampler": repr(sampler),
            "model": model_fingerprint(model), "job": job or {}}


def _check_manifest(out_dir, manifest):
    """Rank 0 writes the manifest, or compares it with the one in out_dir; every rank then gets the
    same verdict (so all raise the same error). Returns the error message or None."""
    path = os.path.join(out_dir, MANIFEST)
    error = None
    if rank_and_world()[0] == 0:
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                old, error = None, f"out_dir {out_dir!r}: cannot read its {MANIFEST} ({e})"
            if old is not None and old != manifest:
                old, new = _flat(old), _flat(manifest)
                diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                error = (f"out_dir {out_dir!r} holds a job with other arguments ({', '.join(diff)}; "
                         f"{diff[0]}: {old.get(diff[0])!r} there, {new.get(diff[0])!r} now); use another out_dir")
        else:
            _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        for stale in glob.glob(os.path.join(out_dir, ".*.tmp")):  # a killed run's partial writes
            os.remove(stale)
    return _broadcast(error)


def _flat(d, prefix=""):
    """{"job": {"nfe": 10}} -> {"job.nfe": 10}: manifest keys for a readable difference."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _atomic_write(path, data):
    """Write bytes to ``path`` through a temporary file in the same directory and a rename, so a
    reader (or a resumed run) never sees a partial file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path, index, samples):
    import io
    buf = io.BytesIO()
    np.savez(buf, index=index, samples=samples)
    _atomic_write(path, buf.getvalue())


def shard_paths(out_dir, num_samples, batch_size):
    """[(k, path, first index, count)] of every shard of the job."""
    return [(k, os.path.join(out_dir, _SHARD.format(k)), k * batch_size,
             min(batch_size, num_samples - k * batch_size)) for k in range(math.ceil(num_samples / batch_size))]


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def generate(model, sde, sampler, num_samples, batch_size, seed, out_dir, data_shape, device="cpu", job=None,
             progress=True):
    """Draw ``num_samples`` samples with ``sampler`` (a fastint.Sampler for ``sde``) into shards in
    ``out_dir`` (created if missing); resumes a job with the same arguments, refuses one with other
    arguments. Call it on every rank of an initialised process group to share the work (or alone).

    data_shape: the data's shape [C, ...] (the state adds the process's extra channels); device:
    where this rank samples; job: extra JSON-able arguments to record in the manifest (e.g. the
    checkpoint name), compared on resume. Returns {"shards", "written", "skipped"} for the whole
    job (samples written now, shards already done before).
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, -(2**63))
    if sampler.info.stochastic and sampler.noise == "torch":
        raise ValueError("sampler uses noise='torch', which depends on the batch; sharded generation needs "
                         "noise='philox' (per-sample counters)")
    os.makedirs(out_dir, exist_ok=True)
    error = _check_manifest(out_dir, _manifest(model, sde, sampler, num_samples, batch_size, seed, data_shape, job))
    if error:
        raise ValueError(error)
    shards = shard_paths(out_dir, num_samples, batch_size)
    pending = _broadcast([s for s in shards if not os.path.exists(s[1])] if rank_and_world()[0] == 0 else None)
    rank, world = rank_and_world()
    mine = pending[rank::world]
    done_before = num_samples - sum(s[3] for s in pending)
    bar = None
    if progress and rank == 0 and pending:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=num_samples, initial=done_before, desc="fastint sample", unit="sample")
        except ImportError:  # tqdm is optional: no bar, same job
            pass
    key = philox_key(seed)
    device = torch.device(device)
    try:
        for r in range(math.ceil(len(pending) / world)):
            count = 0
            if r < len(mine):
                _, path, first, count = mine[r]
                zT = prior_draw(sde, data_shape, seed, first, count, device)
                x = sampler.sample(model, zT, seed=key, first_index=first)
                _write_shard(path, np.arange(first, first + count, dtype=np.int64), x.float().cpu().numpy())
            n = int(_all_sum(torch.tensor([float(count)], dtype=torch.float64), device)[0])
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if dist.is_initialized():
        dist.barrier()
    return {"shards": len(shards), "written": num_samples - done_before, "skipped": len(shards) - len(pending)}


def load(out_dir):
    """(index, samples) of a finished job in ``out_dir``, sorted by index; ValueError if a shard is
    missing or the shards disagree with the manifest."""
    parts = [_read_shard(p, first, count) for _, p, first, count in _finished_shards(out_dir)]
    return (np.concatenate([i for i, _ in parts]), np.concatenate([x for _, x in parts]))


def _finished_shards(out_dir):
    """shard_paths of the finished job in ``out_dir``; ValueError naming the missing shards."""
    manifest = read_manifest(out_dir)
    shards = shard_paths(out_dir, manifest["num_samples"], manifest["batch_size"])
    missing = [p for _, p, _, _ in shards if not os.path.exists(p)]
    if missing:
        raise ValueError(f"out_dir {out_dir!r}: {len(missing)} of {len(shards)} shards are missing "
                         f"(first {os.path.basename(missing[0])}); re-run the job to complete it")
    return shards


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"out_dir {out_dir!r} holds no {MANIFEST} (not a fastint sample directory)")
    with open(path) as f:
        return json.load(f)


def _read_shard(path, first, count):
    with np.load(path) as d:
        index, samples = d["index"], d["samples"]
    if not np.array_equal(index, np.arange(first, first + count)):
        raise ValueError(f"{path}: holds indices {index[:1]}..., expected [{first}, {first + count})")
    return index, samples


def frechet_distance(out_dir, reference, features="classifier", classifier=None, device="cpu"):
    """The Fréchet distance between the samples of a finished job in ``out_dir`` and ``reference``
    (a tensor of real data), with the feature statistics of the shards summed over the ranks of
    the process group (each rank reads its share of the shards): equal to the single-process
    value up to float64 summation order."""
    from .metrics import feature_stats, frechet_from_stats

    shards = _finished_shards(out_dir)
    rank, world = rank_and_world()
    d = None
    n, s1, s2 = 0, 0.0, 0.0
    for _, path, first, count in shards[rank::world]:
        _, x = _read_shard(path, first, count)
        c, a, b = feature_stats(torch.from_numpy(x), features, classifier)
        n, s1, s2 = n + c, s1 + a, s2 + b
        d = a.numel()
    ref = feature_stats(torch.as_tensor(reference), features, classifier)
    d = ref[1].numel() if d is None else d
    flat = torch.zeros(1 + d + d * d, dtype=torch.float64)
    if n:
        flat[0], flat[1:1 + d], flat[1 + d:] = n, s1, s2.reshape(-1)
    flat = _all_sum(flat, device)
    stats = (int(flat[0]), flat[1:1 + d], flat[1 + d:].reshape(d, d))
    return frechet_from_stats(stats, ref)
