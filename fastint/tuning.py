"""Tuned defaults of lambda_ddim's options (lam, b) per process and NFE (issue 3, item 4).

The values below are the output of ``python bench/tune_lambda.py`` (bench/results/
lambda_tuning.json, NFE 10-200; lambda_tuning_low_nfe.json, NFE 3 and 5): a grid search over
lam on analytic Gaussian mixtures, scoring the geometric mean, over mixtures, of the endpoint
error relative to ddim (lam = 0), among the lam that are no worse than ddim on any tuning
mixture and whose error stays below 10x the data scale (so lam = 0 where none is). The search,
the full tables and the held-out check are in docs/tuning.md. Do not edit a value by hand:
re-run the script and copy its "Tuned defaults" table.

The tuning used the processes' default parameters (VPSDE(), PSLD(), CLD()), the quadratic
grid and denoise=True; for other settings the values are a starting point, not a measurement.
A process class not listed here gets lam = 0 (ddim).
"""
from __future__ import annotations

import math

__all__ = ["TUNED_LAMBDA", "NFE_RANGES", "tuned_lambda", "tuned_lambda_on_knots"]

# NFE ranges, each represented by the NFE tuned at (5, 10, 20, 50, 100, 200); the breakpoints
# are the geometric midpoints between neighbouring tuned NFEs, rounded. (NFE 3 was tuned too: the
# same values as NFE 5, so it shares its range.)
NFE_RANGES = ((1, 7), (8, 14), (15, 31), (32, 70), (71, 141), (142, math.inf))

# process class name -> per NFE range: (preferred b, {b: best lam for that b}).
# Source: `python bench/tune_lambda.py` (full run, 516 s on two busy CPU threads) and its
# `--nfes 3 5 --stem lambda_tuning_low_nfe` run, copied from bench/results/lambda_tuning.json and
# lambda_tuning_low_nfe.json "tuned"; VP has no all-ones B (𝟙 = I), so its "ones" = "identity".
# The comments give the geometric-mean error relative to ddim on the tuning mixtures.
TUNED_LAMBDA = {
    "VPSDE": (
        ("identity", {"identity": 0.0, "ones": 0.0}),  # NFE 3 and 5: every lam != 0 worse (5.9x, 1.4x at best)
        ("identity", {"identity": -0.25, "ones": -0.25}),  # NFE 10: error / ddim 0.51
        ("identity", {"identity": -0.25, "ones": -0.25}),  # NFE 20: error / ddim 0.267
        ("identity", {"identity": -0.5, "ones": -0.5}),  # NFE 50: error / ddim 0.257
        ("identity", {"identity": -0.5, "ones": -0.5}),  # NFE 100: error / ddim 0.294
        ("identity", {"identity": -0.5, "ones": -0.5}),  # NFE 200: error / ddim 0.288
    ),
    "PSLD": (
        ("identity", {"identity": 0.0, "ones": 0.0}),  # NFE 3 and 5: every lam diverges (errors >= 1e3): ddim
        ("identity", {"identity": 0.0, "ones": 0.0}),  # NFE 10: no lam beats ddim on every mixture
        ("ones", {"identity": 6.0, "ones": 3.0}),  # NFE 20: error / ddim 0.416
        ("ones", {"identity": 4.0, "ones": 2.0}),  # NFE 50: error / ddim 0.375
        ("ones", {"identity": 1.5, "ones": 2.0}),  # NFE 100: error / ddim 0.32
        ("ones", {"identity": 1.0, "ones": 2.5}),  # NFE 200: error / ddim 0.271
    ),
    "CLD": (
        ("identity", {"identity": 0.0, "ones": 0.0}),  # NFE 3 and 5: every lam diverges (errors >= 1e3): ddim
        ("identity", {"identity": 0.0, "ones": 0.0}),  # NFE 10: no lam beats ddim on every mixture
        ("ones", {"identity": 6.0, "ones": 3.0}),  # NFE 20: error / ddim 0.42
        ("ones", {"identity": 4.0, "ones": 2.0}),  # NFE 50: error / ddim 0.38
        ("ones", {"identity": 2.0, "ones": 2.0}),  # NFE 100: error / ddim 0.322
        ("ones", {"identity": 0.75, "ones": 2.5}),  # NFE 200: error / ddim 0.264
    ),
}


def _range_index(nfe):
    for i, (lo, hi) in enumerate(NFE_RANGES):
        if lo <= nfe <= hi:
            return i
    raise ValueError(f"nfe must be >= 1, got {nfe}")


def tuned_lambda(sde, nfe, b=None):
    """The tuned ``(lam, b)`` of lambda_ddim for process ``sde`` at ``nfe`` model calls.

    With ``b`` given, the lam tuned for that b; otherwise the better b and its lam. Processes
    are matched by their class name (VPSDE, PSLD, CLD); any other process gets (0.0, b or
    "identity"), i.e. ddim.
    """
    rows = TUNED_LAMBDA.get(type(sde).__name__)
    if rows is None:
        return 0.0, b or "identity"
    best_b, lams = rows[_range_index(int(nfe))]
    b = best_b if b is None else b
    return float(lams.get(b, 0.0)), b


def tuned_lambda_on_knots(steps):
    """VP's tuned lam for ``steps`` steps on diffusers / k-diffusion knots (the drop-in
    LambdaDDIMScheduler, fastint.k_diffusion.sample_lambda_ddim), whose last step maps to x̂0.

    Below 8 steps this is the NFE-10 value, not the NFE 1-7 row: that row (ddim) was tuned on the
    Sampler's quadratic grid with denoise, where every lam != 0 is worse, while on 'trailing'
    knots the NFE-10 value at 5 and 6 steps measured 0.83 and 0.90 of the best diffusers peer's
    endpoint error against diffusers DDIM's 1.14 and 1.12 (bench/results/study_dropin.md,
    docs/tuning.md).
    """
    _, lams = TUNED_LAMBDA["VPSDE"][_range_index(max(int(steps), NFE_RANGES[1][0]))]
    return float(lams["identity"])
