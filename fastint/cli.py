"""The `fastint` command line.

Every command takes ``--threads N`` (torch's intra-op CPU threads, set before the command runs).
"""
import argparse
import sys

# The default of --threads, measured: on a busy 2-core machine `fastint sample` (shipped PSLD model,
# 256 samples) took 3-10x longer with 2 threads than with 1, same samples (docs/dropin.md,
# "Command line"); on an idle machine with more cores a larger --threads may pay.
DEFAULT_THREADS = 1


def _positive_ints(text):
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"every NFE must be >= 2, got {text!r}")
    return vals


def _version():
    """'fastint X (torch Y, triton Z or not installed)': what a bug report needs."""
    import torch

    from . import __version__
    try:
        import triton
        tri = f"triton {triton.__version__}"
    except ImportError:
        tri = "no triton (CPU only)"
    return f"fastint {__version__} (torch {torch.__version__}, {tri})"


class _Version(argparse.Action):
    """--version: prints _version() (computed only when asked: it imports triton) and exits."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _option_text(o):
    """One method option as 'name=default (allowed values)' for `fastint methods`."""
    from .methods import TUNED
    default = "tuned per process and NFE" if o.default == TUNED else repr(o.default)
    if o.kind == "choice":
        allowed = "|".join(o.choices)
    elif o.kind == "int":
        allowed = "|".join(f"{v:g}" for v in o.ints)
    elif o.kind == "bool":
        allowed = "True|False"
    elif o.kind == "count":
        allowed = f"whole numbers {o.low:g} to {o.high:g}"
    else:
        allowed = f"{o.low:g} to {o.high:g}"
    return f"{o.name}={default} ({allowed})"


def print_methods(out=print):
    """`fastint methods`: one line per method, then the processes it supports and its options."""
    from .coefficients import METHODS
    out(f"{'method':11} {'NFE/step':>8} {'stochastic':>10}  {'order':18}  description")
    for name, m in METHODS.items():
        out(f"{name:11} {m.calls_per_step:>8} {str(m.stochastic):>10}  {m.order:18}  {m.summary}")
        if m.alias_of:
            opts = f"none (alias of {m.alias_of}" + (f" with {m.alias_options}" if m.alias_options else "") + ")"
        else:
            opts = ", ".join(_option_text(o) for o in m.specs) or "none"
        out(f"{'':11} processes: {m.processes()}; options: {opts}")
        if any(o.name == "interp" for o in m.specs) and "FlowMatch" in m.processes():
            from .flow import DEFAULT_INTERP, FLOW_INTERP
            out(f"{'':11} on FlowMatch: interp={DEFAULT_INTERP!r} ({'|'.join(FLOW_INTERP)})")
    out("Options are keyword arguments of fastint.Sampler, or --option NAME=VALUE of `fastint sample`.")


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line on stderr, ``<prog>: error: <message>``, exit code 2
    (no usage block: `fastint <cmd> --help` prints that). Subparsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


# Leading internal names (keyword arguments of fastint's Python API, which its ValueErrors name) ->
# the flag of the command that sets them: (regular expression, replacement), applied in turn.
_B = r"(?=[ =:,]|$)"  # the end of a name
SAMPLE_RENAMES = ((rf"^nfe{_B}", "--nfe"), (r"^(--nfe=\S+ does not fit) method '", r"\1 --method '"),
                  (rf"^method{_B}", "--method"), (rf"^grid{_B}", "--grid"), (rf"^option{_B}", "--option"))
TRAIN_RENAMES = ((r"^model option ", ""), (rf"^(steps|batch|lr|ema|seed|ch|process|arch){_B}", r"--\1"),
                 (rf"^ch_mult{_B}", "--ch-mult"), (rf"^ode_steps{_B}", "--ode-steps"), (rf"^decay{_B}", "--ema"),
                 (r"^expected comma-separated integers", r"--ch-mult: \g<0>"),
                 (r"^Invalid learning rate: (.*)$", r"--lr must be >= 0, got \1"),
                 (r"^no checkpoint at ", r"--resume: \g<0>"), (r"^'.*' is not a resumable ", r"--resume \g<0>"))
DEMO_RENAMES = ((rf"^nfe{_B}", "--nfe"), (rf"^n_samples{_B}", "--samples"), (rf"^method{_B}", "--method"),
                (rf"^grid{_B}", "--grid"), (rf"^checkpoint{_B}", "--checkpoint"),
                (r"^no checkpoint at ", r"--checkpoint: \g<0>"))


def _one_line(message):
    """``message`` on one line: line breaks become spaces (other whitespace, e.g. in a quoted
    path, is kept)."""
    return " ".join(str(message).splitlines())


def check_output_file(flag, path, error):
    """``error`` (a usage error, which exits) when the output file ``path`` of ``flag`` cannot be
    written: a directory, or in a directory that does not exist or is not writable. Commands call
    it before any work, so a long run is not lost at its end on a mistyped path."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        error(f"{flag} {path!r}: is a directory{'' if os.path.isdir(path) else ' name'}, not a file")
    if not os.path.isdir(folder):
        error(f"{flag} {path!r}: the directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        error(f"{flag} {path!r}: the directory {folder!r} is not writable")


def flag_message(message, renames):
    """``message`` (the text of a ValueError from fastint's API) on one line, its leading internal
    name spelled as the command line's flag: 'nfe must lie in ...' -> '--nfe must lie in ...'."""
    import re

    message = _one_line(message)
    for pattern, repl in renames:
        message = re.sub(pattern, repl, message, count=1)
    return message


def _threads(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return n


def main(argv=None):
    common = _Parser(add_help=False)
    common.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help=f"torch CPU threads (default {DEFAULT_THREADS}: on a busy 2-core machine 2 threads "
                        "measured many times slower than 1)")
    parser = _Parser(prog="fastint", description="Fast diffusion sampling.")
    parser.add_argument("--version", action=_Version, help="print fastint's, torch's and triton's versions")
    parser.add_argument("--threads", type=_threads, default=None, dest="threads_before", metavar="N",
                        help="the command's --threads, given before the command")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common],
                          help="sample digits with the shipped PSLD ContinuousUNet, write a PNG and print "
                          "Fréchet distances; --toy: the analytic-mixture table")
    demo.add_argument("--toy", action="store_true", help="the analytic-mixture table of every method instead")
    demo.add_argument("--out", default=None, help="PNG grid of samples (default fastint_demo.png)")
    demo.add_argument("--checkpoint", default=None, help="denoiser: psld, vp or a checkpoint path (default psld)")
    demo.add_argument("--method", default=None, help="sampler (default: the recommended one: cspsd on PSLD/CLD, "
                      "conj_ms with fastint.demo.RECOMMENDED_VP's settings on VP)")
    demo.add_argument("--samples", type=int, default=None, help="digits to sample (default 500)")
    demo.add_argument("--process", default=None, help="--toy: comma-separated vp, psld, cld (default: all)")
    demo.add_argument("--nfe", type=_positive_ints, default=None,
                      help="NFE (default 20); --toy: comma-separated NFEs (default 10,20,50,100)")
    demo.add_argument("--batch", type=int, default=None, help="--toy: number of samples (default 512)")
    demo.add_argument("--grid", default=None, help="--toy: time grid (default quadratic)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-peers", action="store_true",
                      help="skip the comparison with diffusers' best schedulers on the VP digits model")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    methods = sub.add_parser("methods", parents=[common],
                             help="list the integrators, the processes each supports and its options")
    from .train import add_arguments as _train_arguments
    train = sub.add_parser("train", parents=[common],
                           help="train a denoiser (or the digit classifier) on the 8x8 digits")
    _train_arguments(train)
    from . import bench as _bench
    bench = sub.add_parser("bench", parents=[common],
                           help="time the fused step op against eager PyTorch and torch.compile; "
                           "print a table and write JSON", description=_bench.__doc__.split("\n\n")[0])
    _bench.add_arguments(bench)
    from . import cli_sample as _sample
    sample = sub.add_parser("sample", parents=[common],
                            help="draw samples with any method from a checkpoint or the analytic mixture; "
                            "write .npz or .png")
    _sample.add_arguments(sample)
    args = parser.parse_args(argv)
    command = {"demo": demo, "methods": methods, "train": train, "bench": bench, "sample": sample}[args.command]
    if args.threads is None:  # given after the command wins, then before it, then the default
        args.threads = DEFAULT_THREADS if args.threads_before is None else args.threads_before
    if args.threads < 1:
        command.error(f"--threads must be >= 1, got {args.threads}")
    import torch
    torch.set_num_threads(args.threads)

    if args.command == "methods":
        print_methods()
        return 0
    if args.command == "sample":
        return _sample.main_from_args(args, sample.error)
    if args.command == "bench":
        return _bench.main_from_args(args, bench.error)
    if args.command == "train":
        from .train import main_from_args as _train_main
        return _train_main(args, lambda message: train.error(flag_message(message, TRAIN_RENAMES)))
    if args.command == "demo":
        # each mode refuses the other's flags: nothing given is ignored silently
        other = (("--process", args.process), ("--batch", args.batch), ("--grid", args.grid)) if not args.toy else \
            (("--checkpoint", args.checkpoint), ("--method", args.method), ("--samples", args.samples),
             ("--out", args.out), ("--no-peers", args.no_peers or None))
        given = [flag for flag, value in other if value is not None]
        if given:
            demo.error(f"{', '.join(given)} "
                         f"{'is' if len(given) == 1 else 'are'} for {'the image demo' if args.toy else '--toy'} only")
        if not args.toy and args.nfe is not None and len(args.nfe) > 1:
            demo.error("one --nfe for the image demo (a comma-separated list is for --toy)")
    if args.command == "demo" and not args.toy:
        from .demo import run_image_demo
        args.checkpoint = "psld" if args.checkpoint is None else args.checkpoint
        args.samples = 500 if args.samples is None else args.samples
        args.out = "fastint_demo.png" if args.out is None else args.out
        check_output_file("--out", args.out, demo.error)
        if args.samples < 2:
            demo.error(f"--samples must be >= 2, got {args.samples}")
        nfe = (args.nfe or (20,))[0]
        try:
            progress = not args.no_progress
            run_image_demo(args.checkpoint, nfe=nfe, n_samples=args.samples,
                           method=args.method, out_png=args.out, seed=args.seed, progress=progress)
            if not args.no_peers:
                from .demo import compare_with_peers
                print()
                compare_with_peers("vp", nfe=nfe, n_samples=args.samples, seed=args.seed, progress=progress)
                from .demo import compare_flow_with_peers
                print()
                compare_flow_with_peers(nfe=10, n_samples=args.samples, seed=args.seed, progress=progress)
        except (ValueError, FileNotFoundError) as e:
            demo.error(flag_message(e, DEMO_RENAMES))
        return 0
    if args.command == "demo":
        from .demo import PROCESSES, run_demo
        args.batch = 512 if args.batch is None else args.batch
        args.grid = "quadratic" if args.grid is None else args.grid
        procs = tuple(p.strip() for p in (args.process or "vp,psld,cld").split(","))
        bad = [p for p in procs if p not in PROCESSES]
        if bad:
            demo.error(f"--process: unknown {bad}; expected some of {sorted(PROCESSES)}")
        if args.batch < 2:
            demo.error(f"--batch must be >= 2, got {args.batch}")
        from .grids import GRIDS
        if args.grid not in GRIDS:  # before the table starts (and its progress bar)
            demo.error(f"--grid must be one of {list(GRIDS)}, got {args.grid!r}")
        try:
            run_demo(procs, args.nfe or (10, 20, 50, 100), batch=args.batch, seed=args.seed, grid=args.grid,
                     progress=not args.no_progress)
        except ValueError as e:  # e.g. an unknown --grid
            demo.error(flag_message(e, DEMO_RENAMES))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
