"""GPU check in one command: ``python bench/gpu_check.py [--out bench/results/gpu_check]``.

On a CUDA machine, in under 5 minutes:

1. correctness: the Triton kernel (torch.ops.fastint.step and step_out) against the plain-PyTorch
   reference in float64, over dim 1 / 2, K = 1..3, float32 / float16 / bfloat16, contiguous /
   channels_last, no noise / a noise tensor / Philox;
2. the whole loop captured into one CUDA graph (Sampler.run: ddim, conj_ms k=3, sddim with Philox):
   replay with a new input equals the eager loop; a stochastic replay draws fresh noise;
3. bandwidth: the op (new output, and out= into a preallocated one) against a device-to-device copy
   between preallocated buffers, each timed over rotating buffer sets of at least 4x the L2 size so
   that L2 does not flatter them, 1M..64M elements;
4. the loop: the captured sampling loop with a trivial model (it returns its input), per-row bandwidth
   against the same copy.

Results go to ``<out>.json`` and ``<out>.md`` (default bench/results/gpu_check). Without a GPU it
prints a message and exits with status 0 (``--dry-run-cpu`` runs the same code on the CPU kernel at
small sizes, to check the script itself).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import fastint
from fastint.bench import eager_step, format_size, state_shape
from fastint.ops import step, step_reference


def timer(device):
    """fn -> seconds per call (min over reps), CUDA events on a GPU, perf_counter on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=100, quantiles=[0.0, 0.5])[0] * 1e-3  # min, ms -> s

    def cpu(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)
    return cpu


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- 1. correctness
def check_kernel(device, log):
    rows = []
    g = torch.Generator().manual_seed(0)
    for dim in (1, 2):
        for k in (1, 2, 3):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for layout in ("contiguous", "channels_last"):
                    for noise in ("none", "tensor", "philox"):
                        shape = (3, 4 * dim, 17, 9)
                        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

                        def make():
                            return torch.randn(shape, generator=g).to(dtype).to(device, memory_format=fmt)
                        z, eps = make(), [make() for _ in range(k)]
                        coef = (torch.randn(4, 7 + 4 * k, generator=g) * 0.5).to(device)
                        kw = {}
                        if noise == "tensor":
                            kw["noise"] = make().float()
                        elif noise == "philox":
                            kw = {"seed_tensor": torch.tensor([12345], device=device), "offset": 2**40 + 3}
                        got = step(z, eps, coef, 2, dim, **kw)
                        out = torch.empty_like(z)
                        step(z, eps, coef, 2, dim, out=out, **kw)
                        ref = step_reference(z, eps, coef, 2, dim, **kw, compute_dtype=torch.float64,
                                             out_dtype=torch.float64)
                        err = (got.double() - ref).abs().max().item()
                        tol = (3e-5 if dtype == torch.float32 else 2e-2) * max(1.0, ref.abs().max().item())
                        ok = err <= tol and torch.equal(got, out) and got.is_contiguous(memory_format=fmt)
                        rows.append({"dim": dim, "K": k, "dtype": str(dtype)[6:], "layout": layout, "noise": noise,
                                     "max_err": err, "tol": tol, "out_equal": torch.equal(got, out), "ok": ok})
    bad = [r for r in rows if not r["ok"]]
    log(f"kernel vs reference: {len(rows) - len(bad)}/{len(rows)} cases pass"
        + ("" if not bad else f"; failing: {bad[:3]}"))
    return {"cases": rows, "passed": not bad}


# ------------------------------------------------------------------------------- 2. CUDA graphs
def _capture(fn, device):
    if device != "cuda":
        return None, fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@torch.no_grad()
def check_graphs(device, log):
    rows = []
    for method, kw in (("ddim", {}), ("conj_ms", {"k": 3}), ("sddim", {"eta": 1.0})):
        sde = fastint.VPSDE()
        sampler = fastint.Sampler(sde, method, nfe=10, **kw)
        conv = torch.nn.Conv2d(3, 3, 1).to(device)
        model = lambda z, t: torch.tanh(conv(z)) * t[:, None, None, None]  # noqa: E731
        static_in = torch.randn(4, 3, 32, 32, device=device)
        table, pc = sampler.device_table(device)
        graph, static_out = _capture(lambda: sampler.run(model, static_in, table, pc,
                                                         sampler.philox_key(None, device)), device)
        new = torch.randn_like(static_in)
        static_in.copy_(new)
        if graph is not None:
            graph.replay()
        sync(device)
        rec = {"method": method, "captured": graph is not None}
        if sampler.info.stochastic:
            first = static_out.clone()
            if graph is not None:
                graph.replay()
                sync(device)
            rec["fresh_noise_per_replay"] = not torch.equal(first, static_out)
            rec["ok"] = rec["fresh_noise_per_replay"] or graph is None
        else:
            eager = sampler.run(model, new, table, pc)
            rec["max_err"] = (static_out - eager).abs().max().item() if graph is not None else 0.0
            rec["ok"] = rec["max_err"] <= 1e-5
        rows.append(rec)
    log("CUDA-graph capture of the loop: " + ", ".join(f"{r['method']} {'ok' if r['ok'] else 'FAILED'}" for r in rows))
    return {"cases": rows, "passed": all(r["ok"] for r in rows)}


# ------------------------------------------------------------------------------- 3. bandwidth
def rotating_sets(nbytes, device):
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(32, math.ceil(4 * l2 / max(1, nbytes))))


@torch.no_grad()
def sweep(device, sizes, log):
    t = timer(device)
    rows = []
    cases = [("psld", 2, 1, False, torch.float32), ("psld", 2, 3, False, torch.float32),
             ("psld", 2, 1, True, torch.float32), ("vp", 1, 1, False, torch.float32),
             ("psld", 2, 1, False, torch.bfloat16), ("psld", 2, 1, False, torch.float16)]
    for n in sizes:
        for proc, dim, k, noisy, dtype in cases:
            shape = state_shape(n)
            item = torch.empty((), dtype=dtype).element_size()
            step_bytes = (2 + k) * n * item
            m = rotating_sets(step_bytes, device)
            sets = []
            for _ in range(m):
                z = torch.randn(shape, device=device, dtype=dtype)
                sets.append((z, [torch.randn_like(z) for _ in range(k)], torch.empty_like(z), torch.empty_like(z)))
            coef = (torch.randn(4, 7 + 4 * k) * 0.5).to(device)
            key = torch.tensor([7], device=device) if noisy else None
            i = {"op": 0, "out": 0, "copy": 0, "eager": 0}

            def nxt(name):
                i[name] = (i[name] + 1) % m
                return sets[i[name]]

            def op():
                z, e, _, _ = nxt("op")
                return torch.ops.fastint.step(z, e, coef, 1, dim, None, None, 0, key)

            def op_out():
                z, e, o, _ = nxt("out")
                torch.ops.fastint.step_out(z, e, coef, 1, dim, o, None, None, 0, key)

            def copy():
                z, _, o, _ = nxt("copy")
                o.copy_(z)

            def eager():
                z, e, _, _ = nxt("eager")
                return eager_step(z, e, coef, 1, dim, noisy)
            tc, to, tf, te = t(copy), t(op_out), t(op), t(eager)
            copy_gbps = 2 * n * item / tc / 1e9
            rec = {"case": f"{proc}-{'em' if noisy else 'ddim' if k == 1 else f'ms{k}'} {format_size(n)} "
                           f"{str(dtype)[6:]}", "size": n, "rotating_sets": m, "copy_gbps": copy_gbps,
                   "out_gbps": step_bytes / to / 1e9, "fused_gbps": step_bytes / tf / 1e9,
                   "eager_s": te, "out_s": to, "x_eager": te / to}
            rec["out_fraction_of_copy"] = rec["out_gbps"] / copy_gbps
            rows.append(rec)
            log(f"  {rec['case']:28s} out= {rec['out_gbps']:7.1f} GB/s  fused {rec['fused_gbps']:7.1f}  "
                f"copy {copy_gbps:7.1f}  ({100 * rec['out_fraction_of_copy']:.0f} % of copy, {rec['x_eager']:.1f}x eager)")
            sets.clear()  # free this case's buffers before the next
    return rows


@torch.no_grad()
def loop_bandwidth(device, sizes, log, steps=20):
    t = timer(device)
    rows = []
    for n in sizes:
        sampler = fastint.Sampler(fastint.PSLD(), "ddim", nfe=steps, grid="uniform", denoise=False)
        static_in = torch.randn(state_shape(n), device=device)
        table, pc = sampler.device_table(device)
        model = lambda z, t: z  # noqa: E731
        graph, _ = _capture(lambda: sampler.run(model, static_in, table, pc), device)
        src, dst = torch.empty_like(static_in), torch.empty_like(static_in)
        replay = graph.replay if graph is not None else (lambda: sampler.run(model, static_in, table, pc))
        tl, tc = t(replay), t(lambda: dst.copy_(src))
        rows_n = len(sampler.table)
        gbps = rows_n * 3 * n * 4 / tl / 1e9
        copy_gbps = 2 * n * 4 / tc / 1e9
        rec = {"size": n, "steps": rows_n, "loop_gbps": gbps, "copy_gbps": copy_gbps,
               "fraction_of_copy": gbps / copy_gbps, "per_step_s": tl / rows_n, "cuda_graph": graph is not None}
        rows.append(rec)
        log(f"  loop {format_size(n):5s} x {rows_n}: {gbps:7.1f} GB/s, copy {copy_gbps:7.1f} "
            f"({100 * rec['fraction_of_copy']:.0f} %), {tl / rows_n * 1e6:.1f} us/step")
        del graph
    return rows


def markdown(res):
    lines = [f"# GPU check: {res['device']}", "", f"torch {res['torch']}, {res['date']}, {res['wall_s']:.0f} s", "",
             f"- kernel vs reference: {'pass' if res['kernel']['passed'] else 'FAIL'} "
             f"({len(res['kernel']['cases'])} cases)",
             f"- CUDA-graph capture of the loop: {'pass' if res['graphs']['passed'] else 'FAIL'}", "",
             "| case | out= GB/s | fused GB/s | copy GB/s | out= / copy | x eager | rotating sets |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["sweep"]:
        lines.append(f"| {r['case']} | {r['out_gbps']:.1f} | {r['fused_gbps']:.1f} | {r['copy_gbps']:.1f} | "
                     f"{100 * r['out_fraction_of_copy']:.0f} % | {r['x_eager']:.1f} | {r['rotating_sets']} |")
    lines += ["", "| loop (PSLD ddim, identity model, CUDA graph) | rows | GB/s | copy GB/s | / copy | us/step |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["loop"]:
        lines.append(f"| {format_size(r['size'])} | {r['steps']} | {r['loop_gbps']:.1f} | {r['copy_gbps']:.1f} | "
                     f"{100 * r['fraction_of_copy']:.0f} % | {r['per_step_s'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_check"))
    p.add_argument("--sizes", default="1M,4M,16M,64M", help="state sizes of the sweep (default 1M,4M,16M,64M)")
    p.add_argument("--dry-run-cpu", action="store_true", help="run the script on the CPU kernel at small sizes")
    args = p.parse_args(argv)
    if args.dry_run_cpu:
        device, sizes, loop_sizes = "cpu", [64 << 10], [64 << 10]
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (run it where a GPU is available)")
        return 0
    else:
        from fastint.bench import parse_size

        device = "cuda"
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        loop_sizes = [s for s in sizes if s <= 16 << 20]
    t0 = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    log(f"gpu_check on {name}")
    res = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["kernel"] = check_kernel(device, log)
    res["graphs"] = check_graphs(device, log)
    log("bandwidth sweep (rotating buffers):")
    res["sweep"] = sweep(device, sizes, log)
    log("sampling loop:")
    res["loop"] = loop_bandwidth(device, loop_sizes, log)
    res["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    log(f"wrote {args.out}.json and {args.out}.md ({res['wall_s']:.0f} s)")
    return 0 if res["kernel"]["passed"] and res["graphs"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
