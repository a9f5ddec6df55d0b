"""Throughput of sharded generation (`fastint sample --out-dir`) with 1 and 2 CPU processes under
torchrun (gloo), 1 thread per process, on the shipped VP digits model; and the check that both runs
wrote the same samples. Writes bench/results/study_distributed.{md,json} with --commit.

    python bench/study_distributed.py [--num-samples 2000] [--batch-size 250] [--nfe 20] [--commit]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastint import distributed

HERE = Path(__file__).resolve().parent
FASTINT = str(Path(sys.executable).with_name("fastint"))


def run(nproc, out_dir, args):
    cmd = [FASTINT] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", str(nproc), "--no-python", FASTINT]
    cmd += ["sample", "--threads", "1", "--checkpoint", "vp", "--method", args.method, "--nfe", str(args.nfe),
            "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--out-dir", out_dir,
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    inner = float(r.stdout.split(" samples written in ")[1].split(" s")[0])
    return wall, inner


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--method", default="conj_ms")
    p.add_argument("--commit", action="store_true", help="write bench/results/study_distributed.{md,json}")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            wall, inner = run(nproc, f"{tmp}/p{nproc}", args)
            rows.append({"processes": nproc, "wall_s": wall, "sampling_s": inner,
                         "samples_per_s": args.num_samples / inner})
        same = np.array_equal(distributed.load(f"{tmp}/p1")[1], distributed.load(f"{tmp}/p2")[1])
    lines = [f"# Sharded generation, 1 vs 2 CPU processes ({args.num_samples} samples, VP digits model, "
             f"{args.method} at {args.nfe} NFE, batch {args.batch_size}, 1 thread per process)", "",
             "| processes | wall (s, with start-up) | sampling (s) | samples/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['wall_s']:.1f} | {r['sampling_s']:.1f} | {r['samples_per_s']:.0f} |"
              for r in rows]
    lines += ["", f"Speed-up of sampling: {rows[0]['sampling_s'] / rows[1]['sampling_s']:.2f}x; "
              f"the two runs wrote the same samples bit for bit: {same}."]
    print("\n".join(lines))
    if args.commit:
        (HERE / "results" / "study_distributed.md").write_text("\n".join(lines) + "\n")
        (HERE / "results" / "study_distributed.json").write_text(json.dumps(
            {"args": vars(args), "rows": rows, "bitwise_equal": same}, indent=1))


if __name__ == "__main__":
    main()
