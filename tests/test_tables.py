"""Tables on explicit times, named grids, the method registry and the trimmed history
(docs/design.md: Times, Methods, Tables, The loop)."""
import numpy as np
import pytest
import torch

import fastint
from fastint import CLD, PSLD, VPSDE, grids
from fastint.coefficients import build_table
from fastint.methods import METHODS, Option, check_extension, resolve
from fastint.table import make_table, run

F64 = torch.float64
PROCS = {"vp": VPSDE(), "psld": PSLD(), "cld": CLD(), "ddpm": VPSDE.ddpm()}


def test_named_grid_tables_are_unchanged():
    """The tables of today's named grids equal those of the op that took a grid name and a step
    count (tests/data/named_grid_tables_v0.pt, written by that op before the change to explicit
    times: 304 tables over 4 processes, 4 grids, every method family, with and without denoise)."""
    old = torch.load("tests/data/named_grid_tables_v0.pt")
    assert len(old) == 304
    for c in old:
        tab, times = build_table(PROCS[c["process"]], c["method"], c["grid"], c["n_steps"], t_eps=1e-3,
                                 denoise=c["denoise"], **c["options"])
        scale = c["table"].abs().max()
        assert (tab - c["table"]).abs().max() <= 1e-12 * scale, (c["process"], c["grid"], c["method"])
        assert torch.equal(torch.isnan(times), torch.isnan(c["times"]))
        assert torch.allclose(times.nan_to_num(0), c["times"].nan_to_num(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("method, opts", [("ddim", {}), ("conj_ms", {"k": 3, "interp": "logsnr"}),
                                          ("lambda_ddim", {"lam": 0.4, "b": "identity"}), ("euler", {})])
def test_explicit_times_equal_named_grid(method, opts):
    sde = VPSDE()
    times = grids.make(sde, "edm", 9, 2e-3)
    a = make_table(sde, method, times, denoise=True, **opts)
    b = make_table(sde, method, times.tolist(), denoise=True, **opts)  # a list works too
    c, _ = build_table(sde, method, "edm", 9, t_eps=2e-3, denoise=True, **opts)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.coef, c)
    assert torch.equal(a.times[:-1], times[:-1]) and a.times[-1] == times[-1]


def test_arbitrary_times_ddim_is_textbook():
    """On any decreasing times, the VP ddim row is x' = (α'/α) x + (σ' − α'σ/α) ε."""
    sde = VPSDE()
    t = torch.tensor([1.0, 0.83, 0.4, 0.37, 0.05, 0.011], dtype=F64)
    tab = make_table(sde, "ddim", t)
    a, s = sde.alpha(t), sde.sigma(t)
    assert torch.allclose(tab.coef[:, 0], a[1:] / a[:-1], rtol=1e-13)
    assert torch.allclose(tab.coef[:, 7], s[1:] - a[1:] * s[:-1] / a[:-1], rtol=1e-12)
    assert len(tab) == 5 and tab.calls == (True,) * 5


def test_single_time_with_denoise_is_tweedie():
    sde = VPSDE()
    tab = make_table(sde, "conj_ms", [0.3], denoise=True, k=2)
    t = torch.tensor([0.3], dtype=F64)
    assert len(tab) == 1
    assert tab.coef[0, 0] == pytest.approx(float(1 / sde.alpha(t)), rel=1e-13)
    assert tab.coef[0, 7] == pytest.approx(float(-sde.sigma(t) / sde.alpha(t)), rel=1e-12)


@pytest.mark.parametrize("times, word", [([1.0], "at least 2"), ([1.0, 1.0], "strictly decreasing"),
                                         ([0.5, 0.7], "strictly decreasing"), ([1.5, 0.5], "lie in"),
                                         ([1.0, 0.0], "lie in"), ([1.0, float("nan")], "finite"),
                                         ([[1.0, 0.5]], "1-D"), ("nope", "grid name")])
def test_bad_times_are_clear_errors(times, word):
    with pytest.raises((ValueError, TypeError), match=word):
        make_table(VPSDE(), "ddim", times)


def test_sampler_takes_a_sequence_of_times():
    sde = VPSDE()
    model = fastint.models.GaussianMixture(sde, torch.tensor([[0.5], [-1.0]]), torch.tensor([0.3, 0.2]))
    zT = sde.prior_sample((64, 1), generator=torch.Generator().manual_seed(0))
    t = grids.make(sde, "logsnr", 7, 1e-3)
    a = fastint.Sampler(sde, "conj_ms", grid=t, k=2).sample(model, zT)
    b = fastint.Sampler(sde, "conj_ms", nfe=8, grid="logsnr", k=2).sample(model, zT)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match grid"):
        fastint.Sampler(sde, "conj_ms", nfe=5, grid=t)
    with pytest.raises(TypeError, match="t_eps"):
        fastint.Sampler(sde, "ddim", grid=t, t_eps=1e-3)


@pytest.mark.parametrize("grid", ["karras", "exponential", "beta"])
def test_sigma_space_grids(grid):
    """karras / exponential / beta grids: the ratio r = σ/α at the grid times follows the named
    sigma formula between r(T) and r(t_eps)."""
    sde = VPSDE()
    t = grids.make(sde, grid, 10, 1e-3)
    r = grids.nsr(sde, t).numpy()
    fn = {"karras": grids.karras_sigmas, "exponential": grids.exponential_sigmas, "beta": grids.beta_sigmas}[grid]
    assert np.allclose(r, fn(r[0], r[-1], 11), rtol=1e-9)
    assert (np.diff(t.numpy()) < 0).all()


def test_psld_logsnr_grid_and_underdamped_error():
    t = grids.make(PSLD(), "logsnr", 8)
    lr = torch.log(grids.nsr(PSLD(), t))
    assert torch.allclose(lr[1:] - lr[:-1], (lr[-1] - lr[0]) / 8 * torch.ones(8, dtype=F64), rtol=1e-8)
    with pytest.raises(ValueError, match="Psi_00"):
        grids.make(PSLD(gamma=0.5, nu=1.0, m_inv=4.0), "logsnr", 5)


# --------------------------------------------------------------------------- registry
def test_registry_matches_the_extension():
    check_extension()  # raises on any mismatch
    built = dict(item.split(":", 1) for item in torch.ops.fastint.methods().split(";"))
    assert set(built) == {n for n, m in METHODS.items() if m.alias_of is None}
    assert METHODS["cspsd"].alias_of in built


def test_registry_validates_options_once():
    sde = VPSDE()
    assert resolve(sde, "conj_ms", 10, {"k": 3, "interp": "sigma"})[2] == [3.0, 0.0, 2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="option k must be one of"):
        resolve(sde, "conj_ms", 10, {"k": 4})
    with pytest.raises(TypeError, match="option corrector must be a str"):
        resolve(sde, "conj_ms", 10, {"corrector": 1})
    with pytest.raises(TypeError, match="option lower_final must be a bool"):
        resolve(sde, "conj_ms", 10, {"lower_final": 1})
    with pytest.raises(ValueError, match="option eta must lie in"):
        resolve(sde, "sddim", 10, {"eta": 1.5})
    with pytest.raises(TypeError, match="unknown"):
        resolve(sde, "ddim", 10, {"k": 2})
    with pytest.raises(TypeError, match="takes no options"):
        resolve(PSLD(), "cspsd", 10, {"first": "x"})
    assert resolve(PSLD(), "cspsd", 10, {})[0] == "cvv"
    with pytest.raises(ValueError, match="VP only"):
        resolve(PSLD(), "sddim", 10, {})
    assert Option("x", "float", 0.0, low=0, high=1).encode(0.5) == 0.5


# --------------------------------------------------------------------------- trimmed history
def test_widths_are_the_highest_nonzero_q():
    sde = VPSDE()
    t = grids.make(sde, "logsnr", 8)
    assert make_table(sde, "conj_ms", t, k=3).widths == (1, 2, 3, 3, 3, 3, 3, 3)
    assert make_table(sde, "conj_ms", t, k=3, lower_final=True, denoise=True).widths == \
        (1, 2, 3, 3, 3, 3, 3, 2, 1)
    assert make_table(sde, "conj_ms", t, k=1).widths == (1,) * 8
    assert make_table(sde, "conj_ms", t, k=2, corrector="every").widths[:3] == (1, 2, 3)
    assert make_table(sde, "ddim", t).history == 1


def test_the_loop_passes_only_the_eps_a_row_reads(monkeypatch):
    """DeviceTable.step hands the fused op exactly widths[n] history entries."""
    sde = VPSDE()
    tab = make_table(sde, "conj_ms", grids.make(sde, "logsnr", 6), denoise=True, k=3, lower_final=True)
    dev = tab.to("cpu")
    seen = []
    import fastint.table as T
    real = T.fused_step
    real_out = T._step_out
    monkeypatch.setattr(T, "fused_step", lambda z, hist, *a, **k: seen.append(len(hist)) or real(z, hist, *a, **k))
    monkeypatch.setattr(T, "_step_out", lambda z, hist, *a: seen.append(len(hist)) or real_out(z, hist, *a))
    run(dev, lambda z, n: torch.zeros_like(z), torch.ones(4, 1))  # the loop's buffers: step_out
    assert seen == list(tab.widths) == [1, 2, 3, 3, 3, 2, 1]
    seen.clear()
    run(dev, lambda z, n: torch.zeros_like(z), torch.ones(4, 1), reuse=False)  # a new state per row: step
    assert seen == list(tab.widths)


def test_lower_final_equals_reference():
    from fastint.coefficients import reference_table

    sde = VPSDE()
    a, _ = build_table(sde, "conj_ms", "quadratic", 6, denoise=True, k=3, lower_final=True)
    b, _ = reference_table(sde, "conj_ms", "quadratic", 6, denoise=True, k=3, lower_final=True)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    c, _ = build_table(sde, "conj_ms", "quadratic", 6, denoise=True, k=3)
    assert (a - c).abs().max() > 1e-3  # the option really changes the last rows


@pytest.mark.parametrize("interp, corr", [("sigma", "none"), ("t", "inner")])
def test_sigma_interp_and_inner_corrector_equal_reference(interp, corr):
    from fastint.coefficients import reference_table

    sde = VPSDE()
    a, _ = build_table(sde, "conj_ms", "logsnr", 6, denoise=True, k=2, interp=interp, corrector=corr)
    b, _ = reference_table(sde, "conj_ms", "logsnr", 6, denoise=True, k=2, interp=interp, corrector=corr)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(k=2), dict(k=3, interp="logsnr"), dict(k=3, lower_final=True)])
def test_x0_history_rows_equal_reference(opts):
    """conj_ms predict='x0' (the data-prediction exponential integrator) against scipy quadrature."""
    from fastint.coefficients import reference_table

    sde = VPSDE()
    a, _ = build_table(sde, "conj_ms", "logsnr", 7, denoise=True, predict="x0", **opts)
    b, _ = reference_table(sde, "conj_ms", "logsnr", 7, denoise=True, predict="x0", **opts)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_x0_history_k1_is_ddim_and_is_vp_only():
    """With one point, interpolating x̂0 or ε is the same step (DDIM): same samples."""
    sde = VPSDE()
    model = fastint.models.GaussianMixture(sde, torch.tensor([[0.5], [-1.0]]), torch.tensor([0.3, 0.2]))
    zT = sde.prior_sample((64, 1), generator=torch.Generator().manual_seed(0))
    a = fastint.Sampler(sde, "conj_ms", nfe=9, k=1, predict="x0").sample(model, zT)
    b = fastint.Sampler(sde, "ddim", nfe=9).sample(model, zT)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    c = fastint.Sampler(sde, "conj_ms", nfe=9, k=2, predict="x0").sample(model, zT)
    assert (c - b).abs().max() > 1e-4
    assert make_table(sde, "conj_ms", grids.make(sde, "logsnr", 4), k=2, predict="x0").history_conv is not None
    with pytest.raises(ValueError, match="VP only"):
        make_table(PSLD(), "conj_ms", grids.make(PSLD(), "uniform", 4), predict="x0")


def test_make_table_checks_the_process_and_method_first():
    with pytest.raises(TypeError, match="sde must be a fastint process"):
        make_table(None, "ddim", [1.0, 0.5])
    with pytest.raises(ValueError, match="method must be one of"):
        make_table(VPSDE(), ["ddim"], [1.0, 0.5])


def test_sampler_single_time_with_denoise_is_one_tweedie_call():
    sde = VPSDE()
    s = fastint.Sampler(sde, "ddim", grid=[0.4], denoise=True)
    assert s.nfe == 1 and len(s.tab) == 1
    with pytest.raises(ValueError, match="one time with denoise"):
        fastint.Sampler(sde, "ddim", grid=[0.4], denoise=False)
