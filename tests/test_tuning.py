"""Tuned defaults of lambda_ddim (fastint.tuning, bench/tune_lambda.py, docs/tuning.md).

- the lookup returns the stored (lam, b) for every process and NFE range, at both ends;
- the stored values are the ones the committed script wrote (bench/results/lambda_tuning.json);
- a Sampler / table with no lam uses the tuned value; an explicit lam (and b) overrides it,
  and lam = 0 is still ddim bit for bit;
- the tuned default beats ddim on PSLD at NFE 20 and 50 on a held-out mixture that the search
  never saw.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import fastint
from fastint.coefficients import build_table
from fastint.models import GaussianMixture, reference_solution, tweedie_reference
from fastint.tuning import NFE_RANGES, TUNED_LAMBDA, tuned_lambda

from test_coefficients import assert_table_close

F64 = torch.float64
PROCS = {"VPSDE": fastint.VPSDE, "PSLD": fastint.PSLD, "CLD": fastint.CLD}
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "lambda_tuning.json"


def _ends(lo, hi):
    return [lo, hi if math.isfinite(hi) else 1000]


@pytest.mark.parametrize("proc", list(PROCS))
def test_lookup_returns_stored_value_per_range(proc):
    sde = PROCS[proc]()
    rows = TUNED_LAMBDA[proc]
    assert len(rows) == len(NFE_RANGES)
    for (lo, hi), (best_b, lams) in zip(NFE_RANGES, rows):
        for nfe in _ends(lo, hi):
            assert tuned_lambda(sde, nfe) == (lams[best_b], best_b)
            for b, lam in lams.items():
                assert tuned_lambda(sde, nfe, b=b) == (lam, b)


def test_ranges_cover_every_nfe_once():
    assert NFE_RANGES[0][0] == 1 and math.isinf(NFE_RANGES[-1][1])
    for (_, hi), (lo, _) in zip(NFE_RANGES, NFE_RANGES[1:]):
        assert lo == hi + 1


def test_stored_values_are_the_scripts_output():
    """fastint/tuning.py holds exactly what bench/tune_lambda.py wrote (the full run and the
    low-NFE run, not --quick), and every NFE range holds a tuned NFE."""
    runs = [json.loads(path.read_text()) for path in (RESULTS, RESULTS.with_name("lambda_tuning_low_nfe.json"))]
    covered = set()
    for data in runs:
        assert not data["meta"]["quick"]
        for proc, rows in data["tuned"].items():
            for r in rows:
                i = next(i for i, (lo, hi) in enumerate(NFE_RANGES) if lo <= r["nfe"] <= hi)
                covered.add(i)
                best_b, lams = TUNED_LAMBDA[proc][i]
                assert (r["b"], r["lam"]) == (best_b, lams[best_b]), (proc, r["nfe"])
                for b, lam in r["lam_by_b"].items():
                    assert lams[b] == lam, (proc, r["nfe"], b)
    assert covered == set(range(len(NFE_RANGES)))


def test_default_lam_is_no_worse_than_ddim_at_few_calls():
    """The red-team case: at NFE 2-5 the NFE-10 value (VP lam = -0.25) was 21x ddim's error at
    NFE 2. Below 8 calls the tuned default is ddim on every process."""
    for proc in PROCS.values():
        for nfe in range(1, 8):
            assert tuned_lambda(proc(), nfe)[0] == 0.0


def test_unknown_process_falls_back_to_ddim():
    class MyVP(fastint.VPSDE):
        pass

    assert tuned_lambda(MyVP(), 50) == (0.0, "identity")
    assert tuned_lambda(MyVP(), 50, b="ones") == (0.0, "ones")


@pytest.mark.parametrize("proc", list(PROCS))
@pytest.mark.parametrize("nfe", [10, 20, 50, 120])
def test_default_table_uses_tuned_value(proc, nfe):
    sde = PROCS[proc]()
    lam, b = tuned_lambda(sde, nfe)
    got, _ = build_table(sde, "lambda_ddim", "quadratic", nfe - 1, denoise=True)
    want, _ = build_table(sde, "lambda_ddim", "quadratic", nfe - 1, denoise=True, lam=lam, b=b)
    assert torch.equal(got, want)
    s = fastint.Sampler(sde, "lambda_ddim", nfe=nfe)
    assert torch.equal(s.table, want)
    # only b given: the lam tuned for that b
    for bb in ("identity", "ones"):
        lam_b, _ = tuned_lambda(sde, nfe, b=bb)
        got, _ = build_table(sde, "lambda_ddim", "quadratic", nfe - 1, denoise=True, b=bb)
        want, _ = build_table(sde, "lambda_ddim", "quadratic", nfe - 1, denoise=True, lam=lam_b, b=bb)
        assert torch.equal(got, want)


@pytest.mark.parametrize("proc", ["PSLD", "CLD"])
def test_explicit_lam_overrides(proc):
    sde = PROCS[proc]()
    nfe = 50
    lam, b = tuned_lambda(sde, nfe)
    assert lam != 0.0  # tuning moved PSLD/CLD off ddim here (else this test says nothing)
    ddim, _ = build_table(sde, "ddim", "quadratic", nfe - 1, denoise=True)
    tuned = fastint.Sampler(sde, "lambda_ddim", nfe=nfe).table
    assert not torch.equal(tuned, ddim)
    # explicit lam = 0 is ddim: bit for bit alone or with b="identity"; with b="ones" (the
    # tuned b here) lam*ones = 0 takes the expm path, equal to rounding (test_conjugate)
    assert torch.equal(fastint.Sampler(sde, "lambda_ddim", nfe=nfe, lam=0.0).table, ddim)
    assert torch.equal(fastint.Sampler(sde, "lambda_ddim", nfe=nfe, lam=0.0, b="identity").table, ddim)
    assert_table_close(fastint.Sampler(sde, "lambda_ddim", nfe=nfe, lam=0.0, b="ones").table, ddim, rtol=1e-12)
    # explicit lam alone: b = "identity"
    one, _ = build_table(sde, "lambda_ddim", "quadratic", nfe - 1, denoise=True, lam=0.7, b="identity")
    assert torch.equal(fastint.Sampler(sde, "lambda_ddim", nfe=nfe, lam=0.7).table, one)


def test_bad_b_still_rejected_with_tuned_lam():
    with pytest.raises(ValueError, match="option b"):
        fastint.Sampler(fastint.PSLD(), "lambda_ddim", nfe=20, b="diag")
    with pytest.raises(TypeError, match="option b"):
        fastint.Sampler(fastint.PSLD(), "lambda_ddim", nfe=20, b=1)


def _heldout_mixture(sde):
    """6 modes in 6-D, unequal stds and weights: not one of bench/tune_lambda.py's mixtures."""
    g = torch.Generator().manual_seed(2024)
    k, d = 6, 6
    means = torch.randn(k, d, generator=g, dtype=F64) * (2.2 / math.sqrt(d))
    stds = 0.12 + 0.2 * torch.rand(k, generator=g, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.3
    return GaussianMixture(sde, means, stds, weights)


@pytest.fixture(scope="module")
def psld_heldout():
    sde = fastint.PSLD()
    model = _heldout_mixture(sde)
    zT = sde.prior_sample((24, *model.data_shape), generator=torch.Generator().manual_seed(11), dtype=F64)
    z_eps = reference_solution(model, sde, zT, t_eps=1e-3)
    x_ref = sde.data_part(tweedie_reference(model, sde, z_eps, 1e-3))
    return sde, model, zT, x_ref


@pytest.mark.parametrize("nfe", [20, 50])
def test_tuned_default_beats_ddim_on_heldout_psld(psld_heldout, nfe):
    sde, model, zT, x_ref = psld_heldout

    def err(**opts):
        x = fastint.Sampler(sde, "lambda_ddim", nfe=nfe, **opts).sample(model, zT.float()).double()
        return float((x - x_ref).flatten(1).norm(dim=1).mean())

    e_tuned, e_ddim = err(), err(lam=0.0)
    assert e_tuned < 0.8 * e_ddim, (e_tuned, e_ddim)


def test_knot_adapters_keep_the_nfe10_value_below_8_steps():
    """The drop-in and k-diffusion lambda_ddim (last step to x̂0 on the pipeline's knots) keep the
    NFE-10 value at 5-7 steps, where it measured better than ddim (bench/results/study_dropin.md);
    the Sampler's quadratic grid takes the NFE 1-7 row (ddim)."""
    from fastint.diffusers import LambdaDDIMScheduler
    from fastint.tuning import tuned_lambda_on_knots

    nfe10 = tuned_lambda(fastint.VPSDE(), 10)[0]
    assert nfe10 != 0.0 and tuned_lambda(fastint.VPSDE(), 5)[0] == 0.0
    for steps in (1, 5, 7, 10):
        assert tuned_lambda_on_knots(steps) == nfe10
    assert tuned_lambda_on_knots(20) == tuned_lambda(fastint.VPSDE(), 20)[0]
    s = LambdaDDIMScheduler()
    s.set_timesteps(5)
    assert s.lam == nfe10
