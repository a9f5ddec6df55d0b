"""The `fastint` command line."""
import argparse
import sys


def _positive_ints(text):
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"every NFE must be >= 2, got {text!r}")
    return vals


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastint", description="Fast diffusion sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample digits with the shipped PSLD ContinuousUNet, write a PNG and print "
                          "Fréchet distances; --toy: the analytic-mixture table")
    demo.add_argument("--toy", action="store_true", help="the analytic-mixture table of every method instead")
    demo.add_argument("--out", default="fastint_demo.png", help="PNG grid of samples (default fastint_demo.png)")
    demo.add_argument("--checkpoint", default="psld", help="denoiser: psld, vp or a checkpoint path (default psld)")
    demo.add_argument("--method", default=None, help="sampler (default: the recommended one, fastint.demo.RECOMMENDED)")
    demo.add_argument("--samples", type=int, default=500, help="digits to sample (default 500)")
    demo.add_argument("--process", default="vp,psld,cld", help="--toy: comma-separated vp, psld, cld (default: all)")
    demo.add_argument("--nfe", type=_positive_ints, default=None,
                      help="NFE (default 20); --toy: comma-separated NFEs (default 10,20,50,100)")
    demo.add_argument("--batch", type=int, default=512, help="--toy: number of samples (default 512)")
    demo.add_argument("--grid", default="quadratic", help="time grid (default quadratic)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-peers", action="store_true",
                      help="skip the comparison with diffusers' best schedulers on the VP digits model")
    sub.add_parser("methods", help="list the integrators")
    from .train import add_arguments as _train_arguments
    train = sub.add_parser("train", help="train a denoiser (or the digit classifier) on the 8x8 digits")
    _train_arguments(train)
    from . import bench as _bench
    bench = sub.add_parser("bench", help="time the fused step op against eager PyTorch and torch.compile; "
                           "print a table and write JSON", description=_bench.__doc__.split("\n\n")[0])
    _bench.add_arguments(bench)
    from . import cli_sample as _sample
    sample = sub.add_parser("sample", help="draw samples with any method from a checkpoint or the analytic mixture; "
                            "write .npz or .png")
    _sample.add_arguments(sample)
    args = parser.parse_args(argv)

    import fastint  # noqa: F401  (loads the extension, with a clear message if it is missing)

    if args.command == "methods":
        from .coefficients import METHODS
        print(f"{'method':11} {'NFE/step':>8} {'stochastic':>10}  {'order':18}  description")
        for name, m in METHODS.items():
            print(f"{name:11} {m.calls_per_step:>8} {str(m.stochastic):>10}  {m.order:18}  {m.summary}")
        return 0
    if args.command == "sample":
        return _sample.main_from_args(args, sample.error)
    if args.command == "bench":
        return _bench.main_from_args(args, bench.error)
    if args.command == "train":
        from .train import main_from_args as _train_main
        return _train_main(args, train.error)
    if args.command == "demo" and not args.toy:
        from .demo import run_image_demo
        if args.samples < 2:
            parser.error("--samples must be >= 2")
        nfe = (args.nfe or (20,))[0]
        try:
            run_image_demo(args.checkpoint, nfe=nfe, n_samples=args.samples,
                           method=args.method, out_png=args.out, seed=args.seed)
            if not args.no_peers:
                from .demo import compare_with_peers
                print()
                compare_with_peers("vp", nfe=nfe, n_samples=args.samples, seed=args.seed)
                from .demo import compare_flow_with_peers
                print()
                compare_flow_with_peers(nfe=10, n_samples=args.samples, seed=args.seed)
        except (ValueError, FileNotFoundError) as e:
            demo.error(str(e))
        return 0
    if args.command == "demo":
        from .demo import PROCESSES, run_demo
        procs = tuple(p.strip() for p in args.process.split(","))
        bad = [p for p in procs if p not in PROCESSES]
        if bad:
            parser.error(f"--process: unknown {bad}; expected some of {sorted(PROCESSES)}")
        if args.batch < 2:
            parser.error("--batch must be >= 2")
        try:
            run_demo(procs, args.nfe or (10, 20, 50, 100), batch=args.batch, seed=args.seed, grid=args.grid)
        except ValueError as e:  # e.g. an unknown --grid
            demo.error(str(e))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
