"""ContinuousUNet against the DDPM UNet: the table of docs/results.md (between the `models` markers).

1. At 32x32 (untrained): Ho et al.'s CIFAR-10 UNet (`UNet.ddpm_cifar10()`) against
   `ContinuousUNet.cifar32()`: parameters, FLOPs per forward (torch.utils.flop_counter,
   batch 1; a multiply-add counts 2), forward latency on this CPU.
2. On the 8x8 digits, both trained by `fastint train` on VP with the same budget (steps and
   batch): parameters, FLOPs, training time, forward latency, Fréchet distance of samples
   (ddim, NFE 20) to the 1797 digits, and denoising PSNR on the 297 held-out digits at
   several noise levels: x + σn is fed as the VP state at the time where σ_t/α_t = σ and
   denoised in one call (Tweedie, x̂₀ = (z − σ_t ε̂)/α_t); PSNR = 10 log10(2² / MSE).

    python bench/compare_models.py                       # trains the UNet (and the ContinuousUNet if absent)
    python bench/compare_models.py --steps 300 --quick   # smoke run, docs untouched

The trained checkpoints go to --workdir (default /tmp/fastint_compare, not committed) and are
reused when their budget matches; the ContinuousUNet defaults to the shipped VP checkpoint
when its budget matches --steps.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import fastint
from fastint.data import load_digits
from fastint.metrics import frechet_distance
from fastint.models import ContinuousUNet, UNet, load_checkpoint
from fastint.train import TRAIN_DEFAULTS, train_denoiser

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(os.path.dirname(HERE), "docs", "results.md")
BEGIN, END = "<!-- BEGIN models -->", "<!-- END models -->"
SIGMAS = (0.1, 0.2, 0.4, 0.8)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def flops(model, shape):
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(shape), torch.full((shape[0],), 0.5))
    return fc.get_total_flops()


@torch.no_grad()
def latency(model, shape, repeat=5):
    """Median seconds of one forward at `shape` (after one warm-up call)."""
    model.eval()
    z, t = torch.randn(shape), torch.full((shape[0],), 0.5)
    model(z, t)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(z, t)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def denoise_psnr(model, sde, x, sigma, seed=0):
    """PSNR (dB, peak-to-peak 2) of one-call Tweedie denoising of x + sigma * noise."""
    # VP: z = α x0 + σ_t ε, so x + σ n = z / α with σ = σ_t/α_t = sqrt(e^B − 1): B = log(1 + σ²).
    t = float(sde.inv_int_beta(torch.tensor(math.log1p(sigma**2), dtype=torch.float64)))
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    z = a * noisy
    eps = model(z, torch.full((len(x),), t))
    x0 = ((z - s * eps) / a).clamp(-1, 1)
    return 10 * math.log10(4.0 / float(((x0 - x) ** 2).mean())), 10 * math.log10(4.0 / float(((noisy - x) ** 2).mean()))


def compare_32(log):
    rows = []
    shape = (1, 3, 32, 32)
    for name, model in (("UNet (DDPM, CIFAR-10 config)", UNet.ddpm_cifar10()),
                        ("ContinuousUNet.cifar32()", ContinuousUNet.cifar32())):
        rows.append(dict(model=name, params=n_params(model), gflops=flops(model, shape) / 1e9,
                         latency_ms=latency(model, shape) * 1e3, latency_b8_ms=latency(model, (8, 3, 32, 32)) * 1e3))
        log(f"{name}: {rows[-1]}")
    return rows


def trained(arch, steps, batch, path, log):
    """A VP denoiser on the digits trained with the given budget (reusing `path` if it has that budget)."""
    if os.path.exists(path):
        ck = load_checkpoint(path)[2]
        cfg = ck["meta"].get("train_config", {})
        if cfg.get("steps") == steps and cfg.get("batch") == batch:
            log(f"reusing {path}")
            return load_checkpoint(path)[:2] + (ck["meta"].get("seconds"),)
    t0 = time.perf_counter()
    model, sde, _ = train_denoiser("vp", arch, steps=steps, batch=batch, ship=path, progress=True, log=log)
    return model.eval(), sde, time.perf_counter() - t0


def compare_digits(steps, batch, n_samples, nfe, log, cunet_path=None, workdir="/tmp/fastint_compare"):
    os.makedirs(workdir, exist_ok=True)
    ref = load_digits("all")[0]
    x_test = load_digits("test")[0]
    rows = []
    shipped = os.path.join(os.path.dirname(fastint.__file__), "checkpoints", "cunet_vp_digits.pt")
    for arch, name, path in (("cunet", "ContinuousUNet", cunet_path or shipped),
                             ("unet", "UNet", os.path.join(workdir, f"unet_vp_digits_{steps}.pt"))):
        if arch == "cunet" and not os.path.exists(path):
            path = os.path.join(workdir, f"cunet_vp_digits_{steps}.pt")
        model, sde, seconds = trained(arch, steps, batch, path, log)
        zT = sde.prior_sample((n_samples, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        x = fastint.Sampler(sde, "ddim", nfe=nfe).sample(model, zT)
        wall = time.perf_counter() - t0
        row = dict(model=name, params=n_params(model), mflops=flops(model, (1, 1, 8, 8)) / 1e6,
                   train_s=seconds, latency_ms=latency(model, (n_samples, 1, 8, 8)) * 1e3, sample_s=wall,
                   fd=frechet_distance(x, ref), fd_pixels=frechet_distance(x, ref, features="pixels"),
                   config=model.config)
        for sigma in SIGMAS:
            row[f"psnr_{sigma}"], row[f"psnr_in_{sigma}"] = denoise_psnr(model, sde, x_test, sigma)
        rows.append(row)
        log(f"{name}: { {k: v for k, v in row.items() if k != 'config'} }")
    return rows


def markdown(r32, rd, steps, batch, n_samples, nfe):
    u, c = r32
    lines = [
        "## ContinuousUNet against the DDPM UNet",
        "",
        f"Written by `bench/compare_models.py` (`python bench/compare_models.py --steps {steps}`); raw numbers in",
        "`bench/results/compare_models.json`. FLOPs from `torch.utils.flop_counter` (a multiply-add is 2 FLOPs),",
        f"latency is the median of 5 forwards on this machine's CPU (torch threads: {torch.get_num_threads()};",
        "the machine was shared with other jobs, so latencies and training seconds are indicative only).",
        "Discussion: [models.md](models.md).",
        "",
        "**At 32x32, untrained (the paper's setting):**",
        "",
        "| model | parameters | GFLOPs / forward | latency batch 1 (ms) | latency batch 8 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in r32:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['gflops']:.2f} | {r['latency_ms']:.0f} | "
                     f"{r['latency_b8_ms']:.0f} |")
    lines += ["", f"Ratio ContinuousUNet / UNet: parameters {c['params'] / u['params']:.3f}, FLOPs "
              f"{c['gflops'] / u['gflops']:.3f}, latency (batch 8) {c['latency_b8_ms'] / u['latency_b8_ms']:.2f}.", ""]
    lines += [
        f"**On the 8x8 digits, VP, same training budget ({steps} steps at batch {batch}, `fastint train`"
        " defaults otherwise):**",
        f"FD: Fréchet distance of {n_samples} samples (ddim, NFE {nfe}) to the 1797 digits on the classifier's",
        "features (FD px: on pixels). PSNR: one-call denoising of the 297 held-out digits with Gaussian noise σ",
        "(input PSNR in the header).",
        "",
    ]
    head = "| model | parameters | MFLOPs / image | train s | forward ms (batch " + str(n_samples) + ") | FD | FD px |"
    in_psnr = [rd[0][f"psnr_in_{s}"] for s in SIGMAS]
    head += "".join(f" PSNR σ={s} (in {p:.1f}) |" for s, p in zip(SIGMAS, in_psnr))
    lines += [head, "|---|" + "---:|" * (6 + len(SIGMAS))]
    for r in rd:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['mflops']:.1f} | {r['train_s']:.0f} | "
                     f"{r['latency_ms']:.0f} | {r['fd']:.3f} | {r['fd_pixels']:.3f} |"
                     + "".join(f" {r[f'psnr_{s}']:.2f} |" for s in SIGMAS))
    return "\n".join(lines) + "\n"


def write_doc(text):
    doc = open(DOC).read() if os.path.exists(DOC) else ""
    block = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", lambda m: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    with open(DOC, "w") as f:
        f.write(doc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=TRAIN_DEFAULTS["batch"])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cunet", default=None, help="ContinuousUNet VP checkpoint (default: the shipped one)")
    p.add_argument("--workdir", default="/tmp/fastint_compare", help="where trained checkpoints are kept")
    p.add_argument("--quick", action="store_true", help="print only; do not touch docs/results.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r32 = compare_32(print)
    rd = compare_digits(args.steps, args.batch, args.samples, args.nfe, print, args.cunet, args.workdir)
    text = markdown(r32, rd, args.steps, args.batch, args.samples, args.nfe)
    print(text)
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "compare_models.json"), "w") as f:
            json.dump(dict(r32=r32, digits=rd, steps=args.steps, batch=args.batch), f, indent=1)
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
