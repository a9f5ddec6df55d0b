"""The method registry: one spec per integrator (docs/design.md, "Methods").

A spec says what the loop and the entry points need to know about a method: model calls per
step, how many past ε a row can read (``history``), whether it injects noise, which processes
it is defined for, and its options, each typed with its range and default. Validation of user
options happens here, once, at the entry point (``resolve``); the C++ builder keeps only its
internal checks. ``check_extension`` compares the specs with the C++ method list
(``torch.ops.fastint.methods``) when fastint loads, so the two sides cannot drift apart.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

__all__ = ["Option", "MethodInfo", "METHODS", "TUNED", "resolve", "check_method", "check_extension"]

TUNED = "tuned"  # an option default looked up per (process, NFE) in fastint.tuning


@dataclass(frozen=True)
class Option:
    """One method option: ``kind`` "float", "int", "count", "bool" or "choice"; numbers lie in
    [low, high] (``ints``: the allowed integers of an "int"; a "count" is any integer in range); a
    choice is one of ``choices`` (sent to the op as its index code, ``codes``). ``host``: resolved
    here by ``resolve`` into the other options, never sent to the op."""

    name: str
    kind: str
    default: object
    low: float = -math.inf
    high: float = math.inf
    choices: tuple = ()
    codes: tuple = ()
    ints: tuple = ()
    doc: str = ""
    host: bool = False

    def encode(self, value) -> float:
        """The op's float for ``value``; TypeError / ValueError naming the option otherwise."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"option {self.name} must be a bool, got {type(value).__name__}")
            return float(value)
        if self.kind == "choice":
            if not isinstance(value, str):
                raise TypeError(f"option {self.name} must be a str, one of {list(self.choices)}, "
                                f"got {type(value).__name__}")
            if value not in self.choices:
                raise ValueError(f"option {self.name} must be one of {list(self.choices)}, got {value!r}")
            return float(self.codes[self.choices.index(value)])
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"option {self.name} must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"option {self.name} must be finite, got {value}")
        if self.kind == "int" and value not in self.ints:
            raise ValueError(f"option {self.name} must be one of {[int(v) for v in self.ints]}, got {value:g}")
        if self.kind == "count" and value != int(value):
            raise ValueError(f"option {self.name} must be a whole number, got {value:g}")
        if not self.low <= value <= self.high:
            raise ValueError(f"option {self.name} must lie in [{self.low:g}, {self.high:g}], got {value:g}")
        return value


@dataclass(frozen=True)
class MethodInfo:
    """What the sampler needs to know about a method (see the module docstring)."""

    name: str
    calls_per_step: int
    history: int
    stochastic: bool
    specs: tuple = ()
    summary: str = ""
    order: str = ""
    vp_only: bool = False  # defined for VP (dim 1) only
    aug_only: bool = False  # defined for phase-space processes (PSLD, CLD) only
    prologue: int = 0  # leading table rows that make no model call (time NaN)
    alias_of: str | None = None  # a name for another method with fixed options (cspsd)
    alias_options: dict = field(default_factory=dict)
    flow: bool = False  # also defined on the flow-matching path (fastint.flow: data-frame tables)

    @property
    def options(self) -> tuple:
        """Option names, in the op's order."""
        return tuple(o.name for o in self.specs)

    @property
    def defaults(self) -> tuple:
        return tuple(o.default for o in self.specs)

    @property
    def op_specs(self) -> tuple:
        """The options the op receives, in its order (host options resolved before)."""
        return tuple(o for o in self.specs if not o.host)

    def processes(self) -> str:
        base = "VP" if self.vp_only else "PSLD, CLD" if self.aug_only else "VP, PSLD, CLD"
        return base + (", FlowMatch" if self.flow else "")


_FIRST = Option("first", "choice", "x", choices=("x", "m"), codes=(0, 1), doc="the sub-flow taken first")
_K = Option("k", "int", 2, ints=(1.0, 2.0, 3.0), doc="ε outputs the interpolation goes through")
_CORR = Option("corrector", "choice", "none", choices=("none", "start", "every", "inner"), codes=(0, 1, 2, 3),
               doc="Adams-Moulton correction carried by the next row (every: order k + 1; inner: every, "
                   "but none carried into the denoising row)")
_INTERP = Option("interp", "choice", "t", choices=("t", "logsnr", "sigma", "flow", "flow2"), codes=(0, 1, 2, 3, 4),
                 doc="interpolation variable: t, log(sigma/alpha), sigma/alpha (DEIS's rho), "
                     "s = sigma/(alpha + sigma) (the sigma of the flow-matching path with the same SNR), or s^2")
_PREDICT = Option("predict", "choice", "eps", choices=("eps", "x0"), codes=(0, 1),
                  doc="what the history holds and is interpolated: eps, or (VP only) the data prediction x0_hat "
                      "(DPM-Solver++'s frame)")
_K3_BELOW = Option("k3_below", "count", 0, low=0, high=1e6, host=True,
                   doc="below this NFE, k=3 without the corrector, whatever k and corrector say (0: never): "
                       "on the shipped VP model the third-order predictor is ahead at few, long steps and "
                       "behind from 12 on (docs/dropin.md, 'Order by step count')")
_LOWER = Option("lower_final", "bool", False,
                doc="lower the order to the steps left (with the denoising row), as DPM-Solver's lower_order_final")

METHODS = {
    m.name: m
    for m in (
        MethodInfo("euler", 1, 1, False, (), "Euler on the probability-flow ODE", "1", flow=True),
        MethodInfo("em", 1, 1, True, (), "Euler–Maruyama on the reverse SDE", "1/2 strong, 1 weak"),
        MethodInfo("ddim", 1, 1, False, (), "conjugate integrator with B = 0 (exponential integrator; DDIM on VP)", "1",
                   flow=True),
        MethodInfo("lambda_ddim", 1, 1, False,
                   (Option("lam", "float", TUNED, low=-10.0, high=10.0,
                           doc="B = lam I or lam ones; |lam| <= 10: beyond, the integrator is degenerate (samples "
                           "collapse to 0 or overflow even at 50-200 calls)"),
                    Option("b", "choice", TUNED, choices=("identity", "ones"), codes=(0, 1))),
                   "conjugate integrator with B = lam*I, or lam*ones(2,2) with b='ones' (lam = 0: ddim); "
                   "unset lam / b take the values tuned per process and NFE (fastint.tuning)", "1"),
        MethodInfo("sddim", 1, 1, True, (Option("eta", "float", 1.0, low=0.0, high=1.0),),
                   "stochastic DDIM (VP and FlowMatch), eta in [0, 1]: 0 = ddim, 1 = DDPM-like ancestral",
                   "1 (weak)", vp_only=True, flow=True),
        MethodInfo("conj_ms", 1, 3, False, (_K, _CORR, _INTERP, _LOWER, _PREDICT, _K3_BELOW),
                   "conjugate multistep: B = 0, eps interpolated through the last k outputs in t (VP: DEIS tAB) or in "
                   "log(sigma/alpha) (interp='logsnr'); corrector='every' (k <= 2) adds an Adams-Moulton correction "
                   "carried by the next row (no extra call)", "k (every: k+1)", flow=True),
        # Splitting integrators (phase space only; docs/integrators.md §6). n*: naive (a model
        # call before every sub-flow), r*: reduced (one call per step, reused), c*: conjugate
        # splitting (each sub-flow's linear part and score term integrated exactly).
        MethodInfo("nse", 2, 1, False, (_FIRST,),
                   "naive symplectic Euler (x-flow and m-flow, a model call before each)", "1", aug_only=True),
        MethodInfo("nvv", 3, 1, False, (), "naive velocity Verlet (m/2, x, m/2, a model call before each)", "1",
                   aug_only=True),
        MethodInfo("rse", 1, 1, False, (_FIRST,), "reduced symplectic Euler (one model call per step, reused)", "1",
                   aug_only=True),
        MethodInfo("rvv", 1, 1, False, (), "reduced velocity Verlet (one model call per step, reused)", "1",
                   aug_only=True),
        MethodInfo("cse", 1, 1, False, (_FIRST,), "conjugate symplectic Euler: each sub-flow integrated exactly",
                   "1", aug_only=True),
        MethodInfo("cvv", 1, 1, False, (), "conjugate velocity Verlet: each sub-flow integrated exactly", "1",
                   aug_only=True),
        # cspsd: the recommended deterministic splitting sampler, an alias chosen by measurement
        # (docs/results.md, bench/study_splitting.py: cvv has the lowest geometric-mean endpoint
        # error over the 2-D and 16-D PSLD/CLD mixtures from 10 NFE on).
        MethodInfo("cspsd", 1, 1, False, (), "recommended deterministic splitting sampler: conjugate velocity "
                   "Verlet (cvv), chosen by measurement", "1", aug_only=True, alias_of="cvv"),
        MethodInfo("noba", 2, 1, True, (), "naive O-B-A stochastic splitting (a model call before B and A)",
                   "1 (weak)", aug_only=True, prologue=1),
        MethodInfo("nbao", 2, 1, True, (), "naive B-A-O stochastic splitting", "1 (weak)", aug_only=True),
        MethodInfo("nobab", 3, 1, True, (), "naive O-B/2-A-B/2 stochastic splitting", "1 (weak)", aug_only=True,
                   prologue=1),
        MethodInfo("roba", 1, 1, True, (), "reduced O-B-A (one model call per step, reused)", "1 (weak)",
                   aug_only=True),
        MethodInfo("sps", 1, 1, True, (Option("lam_s", "float", 1.0, low=0.0, high=1.0),),
                   "reduced O-B-A with the position noise scaled by lam_s", "1 (weak)", aug_only=True),
        MethodInfo("cspss", 1, 1, True, (), "conjugate stochastic splitting: m/2, x, m/2 flows of the reverse SDE "
                   "each solved exactly in distribution", "1 (weak)", aug_only=True),
        MethodInfo("sscs", 1, 1, True, (), "symmetric splitting CLD sampler (Dockhorn et al.): exact linear half "
                   "steps around an Euler score step", "1 (weak)", aug_only=True, prologue=1),
    )
}


def check_method(sde, method):
    """The MethodInfo of ``method`` for process ``sde``: TypeError / ValueError if either is wrong."""
    if not hasattr(sde, "process_tensor"):
        raise TypeError(f"sde must be a fastint process (VPSDE, PSLD, CLD), got {type(sde).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    info = METHODS[method]
    if info.vp_only and sde.dim != 1:
        raise ValueError(f"method {method!r} is defined for VP only, got {type(sde).__name__}")
    if info.aug_only and sde.dim != 2:
        raise ValueError(f"method {method!r} splits position and momentum: it needs PSLD or CLD, "
                         f"got {type(sde).__name__}")
    return info


def resolve(sde, method, nfe, options):
    """(op method name, MethodInfo, encoded option floats) for ``method`` with user ``options``.

    Aliases resolve to their target; unset options take their defaults, and lambda_ddim's
    TUNED defaults the values tuned for this process and ``nfe`` (fastint.tuning)."""
    info = check_method(sde, method)
    if info.alias_of is not None:
        if options:
            raise TypeError(f"method {method!r} takes no options, got {sorted(options)}")
        method, options = info.alias_of, dict(info.alias_options)
        info = METHODS[method]
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise TypeError(f"method {method!r} takes options {list(info.options)}, got unknown {unknown}")
    values = dict(zip(info.options, info.defaults))
    values.update(options)
    if method == "lambda_ddim":
        _resolve_tuned(sde, nfe, values)
    for spec in info.specs:
        if spec.host:
            spec.encode(values[spec.name])  # TypeError / ValueError naming it
    if method == "conj_ms" and nfe < values["k3_below"]:
        values["k"], values["corrector"] = 3, "none"
    if method == "conj_ms" and values.get("corrector") in ("every", "inner") and values.get("k") == 3:
        raise ValueError(f"option corrector={values['corrector']!r} needs k <= 2 (its correction reads k + 1 past outputs; "
                         "a table row holds 3), got k=3")
    if method == "conj_ms" and values.get("predict") == "x0" and sde.dim != 1:
        raise ValueError(f"option predict='x0' is defined for VP only, got {type(sde).__name__}")
    return method, info, [spec.encode(values[spec.name]) for spec in info.op_specs]


def _is_tuned(value):
    return isinstance(value, str) and value == TUNED


def _resolve_tuned(sde, nfe, values):
    """Fill lambda_ddim's TUNED defaults from fastint.tuning (bench/tune_lambda.py; docs/tuning.md).
    Both unset: the tuned (lam, b) for this process and NFE. Only b given: the lam tuned for that
    b. Only lam given: b = "identity", so an explicit lam keeps one meaning at every NFE."""
    lam_unset, b_unset = _is_tuned(values["lam"]), _is_tuned(values["b"])
    if not (lam_unset or b_unset):
        return
    from .tuning import tuned_lambda

    if lam_unset:
        b = None if b_unset else values["b"]
        lam, b = tuned_lambda(sde, nfe, b=b if isinstance(b, str) else None)
        values["lam"] = lam
        if b_unset:
            values["b"] = b
    else:
        values["b"] = "identity"


def check_extension():
    """RuntimeError unless the C++ method list matches the specs (name, history, option count)."""
    built = {}
    for item in torch.ops.fastint.methods().split(";"):
        name, history, n_options = item.split(":")
        built[name] = (int(history), int(n_options))
    specs = {n: (m.history, len(m.op_specs)) for n, m in METHODS.items() if m.alias_of is None}
    if built != specs:
        diff = sorted(set(built.items()) ^ set(specs.items()))
        raise RuntimeError(f"fastint: the method registry (fastint/methods.py) and fastint._C disagree on {diff}; "
                           "rebuild the extension (make build)")
