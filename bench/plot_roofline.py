"""Roofline plot of `fastint bench` results: achieved bandwidth against the measured copy roof.

    fastint bench --sizes 16K,64K,256K,1M,4M,16M,32M --out bench/results/sweep.json
    python bench/plot_roofline.py bench/results/sweep.json [more.json ...] --out docs/roofline.png

The step op is a streaming kernel (a few flops per byte), so its roof is memory bandwidth: the
left panel shows, per size, the GB/s of fused / torch.compile / eager (bytes a single-pass
kernel must move over time) under the z.clone() bandwidth measured in the same run; the right
panel shows each case's fused op as a fraction of that copy bandwidth.
"""
import argparse
import json
import sys


def load(paths):
    cases, machine = [], None
    for p in paths:
        with open(p) as f:
            res = json.load(f)
        machine = machine or res.get("machine")
        cases += res["cases"]
    dedup = {c["name"]: c for c in cases}  # a case measured in several files: the last one
    return list(dedup.values()), machine or {}


def plot(cases, machine, out, dtype="float32", layout="contiguous"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    sweep = [c for c in cases if c["dtype"] == dtype and c["layout"] == layout]
    series = sorted({(c["process"], c["family"]) for c in sweep})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    roof = {}
    for c in sweep:
        roof[c["size"]] = max(roof.get(c["size"], 0), c["copy_gbps"])
    if roof:
        xs = sorted(roof)
        ax.plot(xs, [roof[x] for x in xs], "k-", lw=2.5, label="copy (z.clone), same run: the roof")
    styles = {"fused": ("-", "o"), "compile": ("--", "s"), "eager": (":", "^")}
    for i, key in enumerate(series):
        rows = sorted((c for c in sweep if (c["process"], c["family"]) == key), key=lambda c: c["size"])
        for impl, (ls, mk) in styles.items():
            pts = [(c["size"], c[impl]["gbps"]) for c in rows if c.get(impl)]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker=mk, ms=4, color=colors[i % len(colors)],
                        label=f"{key[0]}-{key[1]} {impl}" if impl == "fused" or i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("state size (elements)")
    ax.set_ylabel("GB/s (bytes a single pass must move / time)")
    ax.set_title(f"{dtype}, {layout}: fused (solid), torch.compile (dashed), eager (dotted)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)

    big = [c for c in cases if c["size"] == max(c2["size"] for c2 in cases if c2["size"] <= 1 << 20)] or cases
    big = sorted(big, key=lambda c: (c["layout"], c["dtype"], c["process"], c["family"]))
    labels = [f"{c['process']}-{c['family']} {c['dtype']} {c['layout'].replace('channels_last', 'CL')}" for c in big]
    vals = [100 * c["fraction_of_copy"] for c in big]
    bx.barh(range(len(big)), vals, color=[colors[0] if c["family"] != "em" else colors[3] for c in big])
    bx.axvline(50, color="r", ls="--", lw=1, label="target: 50 % of copy")
    bx.set_yticks(range(len(big)), labels, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("fused op, % of copy bandwidth (same size, dtype, layout)")
    bx.set_title(f"size {big[0]['size'] if big else '?'} elements (em: Philox noise, compute-bound)", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle(f"fastint step op roofline: {machine.get('gpu') or machine.get('cpu', '?')}, "
                 f"{machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="fastint bench JSON output(s)")
    ap.add_argument("--out", default="docs/roofline.png", help="PNG path (default docs/roofline.png)")
    ap.add_argument("--dtype", default="float32", help="dtype of the size sweep panel (default float32)")
    ap.add_argument("--layout", default="contiguous", help="layout of the size sweep panel (default contiguous)")
    args = ap.parse_args(argv)
    try:
        cases, machine = load(args.json)
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"cannot read bench results: {e}")
    if not cases:
        ap.error("no cases in the given files")
    plot(cases, machine, args.out, args.dtype, args.layout)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
