"""conj_ms's k3_below (the registry) and ConjugateMultistepScheduler's order3_below: below that
many model calls the third-order predictor without the corrector replaces k and corrector
(docs/dropin.md, "Order by step count"); at that count and above nothing changes."""
import pytest
import torch

import fastint
from fastint.methods import METHODS, resolve
from fastint.models import GaussianMixture
from fastint.table import make_table

SDE = fastint.VPSDE()
BASE = dict(k=2, corrector="inner", predict="x0", interp="logsnr")


def _times(n):
    return torch.linspace(0.999, 0.1, n, dtype=torch.float64)


@pytest.mark.parametrize("n", [2, 5, 10, 11, 12, 20])
def test_table_is_k3_below_the_threshold_and_unchanged_at_it(n):
    got = make_table(SDE, "conj_ms", _times(n), denoise=True, k3_below=11, **BASE)
    k3 = make_table(SDE, "conj_ms", _times(n), denoise=True, **dict(BASE, k=3, corrector="none"))
    base = make_table(SDE, "conj_ms", _times(n), denoise=True, **BASE)
    want = k3 if n < 11 else base
    assert torch.equal(got.coef, want.coef)
    assert not torch.equal(k3.coef, base.coef) or n <= 2  # the two settings differ: the test can tell them apart


def test_resolve_counts_the_calls_and_keeps_the_host_option_from_the_op():
    info = METHODS["conj_ms"]
    assert "k3_below" in info.options and "k3_below" not in [o.name for o in info.op_specs]
    _, _, below = resolve(SDE, "conj_ms", 7, dict(BASE, k3_below=8))
    _, _, at = resolve(SDE, "conj_ms", 8, dict(BASE, k3_below=8))
    assert len(below) == len(at) == len(info.op_specs)
    assert below[:2] == [3.0, 0.0] and at[:2] == [2.0, 3.0]  # k, corrector code (none 0, inner 3)
    # k=3 with a corrector is refused, but not when k3_below is what sets k=3
    _, _, zero = resolve(SDE, "conj_ms", 7, dict(BASE, k3_below=0))
    assert zero[:2] == [2.0, 3.0]


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (2.5, ValueError), ("12", TypeError), (True, TypeError),
                                      (float("inf"), ValueError)])
def test_bad_k3_below_is_refused_by_name(bad, err):
    with pytest.raises(err, match="k3_below"):
        make_table(SDE, "conj_ms", _times(5), k3_below=bad)


def test_sampler_below_the_threshold_samples_as_k3():
    model = GaussianMixture.default(SDE, dim=3)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(nfe=6, grid="leading", t_eps=0.1, denoise=True, predict="x0", interp="logsnr")
    got = fastint.Sampler(SDE, "conj_ms", k=2, corrector="inner", k3_below=7, **kw).sample(model, z)
    k3 = fastint.Sampler(SDE, "conj_ms", k=3, **kw).sample(model, z)
    k2c = fastint.Sampler(SDE, "conj_ms", k=2, corrector="inner", **kw).sample(model, z)
    assert torch.equal(got, k3) and not torch.allclose(k3, k2c, atol=1e-6)


# --------------------------------------------------------------------------- the diffusers scheduler
diffusers = pytest.importorskip("diffusers")
from fastint.diffusers import ConjugateMultistepScheduler  # noqa: E402

CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
DROP = dict(predict="x0", interp="logsnr", final_step="x0", corrector=True, last_timestep=99)


def _loop(sch, n, begin=0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    sch.set_timesteps(n)
    if begin:
        sch.set_begin_index(begin)
    for t in sch.timesteps[begin:]:
        eps = torch.tanh(x) * 0.3 + 0.01 * float(t) / 1000  # a smooth stand-in model
        x = sch.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("n", [5, 10, 11, 12, 20])
def test_scheduler_below_the_threshold_steps_as_solver_order_3(n):
    got = _loop(ConjugateMultistepScheduler.from_config(CFG, **DROP, order3_below=11), n)
    k3 = _loop(ConjugateMultistepScheduler.from_config(CFG, **dict(DROP, solver_order=3, corrector=False)), n)
    base = _loop(ConjugateMultistepScheduler.from_config(CFG, **DROP), n)
    assert torch.equal(got, k3 if n < 11 else base)
    assert not torch.allclose(k3, base, atol=1e-9)


def test_scheduler_decides_on_the_whole_run_not_the_steps_left():
    """img2img (set_begin_index): 20 steps from step 12 on are still a 20-step run (the step lengths
    are those of 20 steps), so order3_below=11 leaves them alone."""
    got = _loop(ConjugateMultistepScheduler.from_config(CFG, **DROP, order3_below=11), 20, begin=12)
    base = _loop(ConjugateMultistepScheduler.from_config(CFG, **DROP), 20, begin=12)
    assert torch.equal(got, base)


@pytest.mark.parametrize("bad", [-1, 2.5, "11", True, None])
def test_scheduler_refuses_a_bad_order3_below(bad):
    with pytest.raises(ValueError, match="order3_below"):
        ConjugateMultistepScheduler.from_config(CFG, order3_below=bad)


def test_recommendations_agree():
    """The recommended Sampler and drop-in switch order at the same count."""
    from fastint.demo import RECOMMENDED_DROPIN, RECOMMENDED_VP

    assert RECOMMENDED_VP["k3_below"] == RECOMMENDED_DROPIN["order3_below"] > 0
