"""Flow matching: FlowMatch, flow tables, Sampler on a flow model, FlowMatchConjugateScheduler.

References: closed forms (Euler on dx/dσ = v), scipy quadrature of the data-frame exponential
integrator in λ, scipy's DOP853 on the exact flow ODE of a Gaussian mixture, and diffusers'
FlowMatchEulerDiscreteScheduler itself.
"""
import math

import numpy as np
import pytest
import torch

import fastint
from fastint.flow import FlowMatch, flow_grid, flow_table, shift_sigmas

F64 = torch.float64


class FlowMixture:
    """x0 ~ (1/K) Σ N(μ_k, s² I): the exact E[x0 | x_σ] on x_σ = (1 − σ) x0 + σ ε, float64."""

    def __init__(self, K=6, d=3, std=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = 2.0 * torch.randn(K, d, generator=g, dtype=F64)
        self.std = std

    def x0(self, x, s):
        x = x.to(F64)
        a = 1 - s
        var = a * a * self.std**2 + s * s
        diff = x[:, None, :] - a * self.mu[None]
        r = torch.softmax(-0.5 * (diff**2).sum(-1) / var, -1)  # equal weights and variances
        return (r[..., None] * (self.mu[None] + (a * self.std**2 / var) * diff)).sum(1)

    def v(self, x, s):
        return (x.to(F64) - self.x0(x, s)) / s  # v = ε − x0 = (x − x0)/σ

    def reference(self, x1, s_end=1e-6):
        """DOP853 on dx/dσ = v from σ = 1 to s_end, then x̂0 there."""
        from scipy.integrate import solve_ivp

        B, d = x1.shape
        sol = solve_ivp(lambda s, y: self.v(torch.from_numpy(y.reshape(B, d)), float(s)).numpy().ravel(),
                        (1.0, s_end), x1.numpy().ravel(), method="DOP853", rtol=1e-11, atol=1e-11)
        return self.x0(torch.from_numpy(sol.y[:, -1].reshape(B, d)), s_end)


@pytest.fixture(scope="module")
def mixture():
    m = FlowMixture()
    x1 = torch.randn(48, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return m, x1, m.reference(x1)


# --------------------------------------------------------------------------- process and grids
def test_flowmatch_path():
    p = FlowMatch(shift=3.0)
    s = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    assert torch.equal(p.alpha(s), 1 - s) and torch.equal(p.sigma(s), s)
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    x = p.marginal_sample(x0, eps, torch.tensor([0.3, 0.7]))
    v = eps - x0
    torch.testing.assert_close(p.velocity_to_x0(v, x, torch.tensor([0.3, 0.7])), x0)
    assert float(shift_sigmas(0.5, 3.0)) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "3"])
def test_flowmatch_bad_shift(bad):
    with pytest.raises((ValueError, TypeError), match="shift"):
        FlowMatch(shift=bad)


@pytest.mark.parametrize("grid", ["uniform", "quadratic", "karras", "exponential", "beta"])
def test_flow_grid(grid):
    s = flow_grid(FlowMatch(shift=3.0), grid, 10, 1e-3)
    assert s.numel() == 11 and s[0] == 1.0 and bool((s[1:] < s[:-1]).all())
    assert float(s[-1]) == pytest.approx(float(shift_sigmas(1e-3, 3.0)), rel=1e-12)


def test_flow_leading_grid_leaves_out_sigma_one():
    """'leading': the last n + 1 of n + 2 uniform points in u, shifted; the first below σ = 1."""
    fm = FlowMatch(shift=3.0)
    s = flow_grid(fm, "leading", 10, 1e-3)
    u = 1e-3 + (1 - 1e-3) * (1 - torch.arange(1, 12, dtype=torch.float64) / 11)
    torch.testing.assert_close(s, shift_sigmas(u, 3.0), rtol=1e-14, atol=0)
    assert s.numel() == 11 and float(s[0]) < 1.0
    assert torch.equal(flow_grid(fm, "uniform", 11, 1e-3)[1:], s)  # uniform with one more step, its first dropped


def test_uniform_grid_is_diffusers_schedule():
    """The uniform grid is FlowMatchEuler's default schedule (float32 there) with t_eps = shift(1/1000):
    diffusers shifts its training range at construction and the inference grid again."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    s = flow_grid(FlowMatch(shift=3.0), "uniform", 11, float(shift_sigmas(1e-3, 3.0)))
    torch.testing.assert_close(s.float(), sched.sigmas[:-1], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- tables
def test_euler_table_is_flow_euler():
    """ddim/euler rows: x' = (σ'/σ) x + (1 − σ'/σ) x̂0 = x + (σ' − σ) v, exactly (σ = 1 included)."""
    s = torch.tensor([1.0, 0.9, 0.55, 0.3, 0.05], dtype=F64)
    for method in ("euler", "ddim"):
        tab = flow_table(s, method, denoise=True)
        ratio = s[1:] / s[:-1]
        torch.testing.assert_close(tab.coef[:4, 0], ratio, rtol=1e-13, atol=0)
        torch.testing.assert_close(tab.coef[:4, 7], 1 - ratio, rtol=1e-12, atol=1e-15)
        assert tab.coef[4, 0] == 0 and tab.coef[4, 7] == 1  # the last step to σ = 0 is x̂0
        assert torch.equal(tab.times, s) and tab.history_conv is None


def _lagrange_reference(sig, k, var="logsnr"):
    """Q_j of the data-frame exponential integrator with x̂0 interpolated in λ = log((1−σ)/σ):
    x' = (σ'/σ) x + σ' ∫_λ^λ' e^λ Σ_j l_j(λ) x̂0_{n−j} dλ (scipy quad), for sigmas in (0, 1)."""
    from scipy.integrate import quad

    lam = np.log((1 - sig) / sig)
    of = {"logsnr": lambda x: x, "sigma": lambda x: 1 / (1 + math.exp(x)),  # the variable at λ
          "sigma2": lambda x: 1 / (1 + math.exp(x)) ** 2}[var]
    rows = []
    for n in range(len(sig) - 1):
        kk = min(k, n + 1)
        nodes = [of(lam[n - m]) for m in range(kk)]
        q = []
        for j in range(kk):
            def lj(x, j=j):
                return np.prod([(of(x) - nodes[m]) / (nodes[j] - nodes[m]) for m in range(kk) if m != j])
            q.append(sig[n + 1] * quad(lambda x: math.exp(x) * lj(x), lam[n], lam[n + 1], epsabs=0, epsrel=1e-13)[0])
        rows.append((sig[n + 1] / sig[n], q))
    return rows


@pytest.mark.parametrize("interp,tol", [("logsnr", 1e-9), ("sigma", 1e-9), ("sigma2", 1e-9)])
@pytest.mark.parametrize("k", [2, 3])
def test_conj_ms_table_against_quadrature(k, interp, tol):
    """Rows against scipy quadrature of the data-frame integrator with x̂0 a polynomial in λ, σ or σ²."""
    sig = np.array([0.97, 0.8, 0.62, 0.41, 0.2, 0.07, 0.01])
    tab = flow_table(torch.from_numpy(sig), "conj_ms", k=k, interp=interp)
    worst = 0.0
    for n, (P, q) in enumerate(_lagrange_reference(sig, k, interp)):
        assert tab.coef[n, 0].item() == pytest.approx(P, rel=1e-12)
        for j, qj in enumerate(q):
            worst = max(worst, abs(tab.coef[n, 7 + 4 * j].item() - qj))
    assert worst < tol


def test_flow_table_errors():
    s = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="method"):
        flow_table(s, "lambda_ddim")
    with pytest.raises(ValueError, match="predict"):
        flow_table(s, "conj_ms", predict="eps")
    with pytest.raises(TypeError, match="options"):
        flow_table(s, "euler", k=2)
    with pytest.raises(ValueError, match="sigmas"):
        flow_table(torch.tensor([0.5, 0.7], dtype=F64), "euler")
    with pytest.raises(ValueError, match="sigmas"):
        flow_table(torch.tensor([1.5, 0.7], dtype=F64), "euler")


# --------------------------------------------------------------------------- Sampler
def _sampler_error(mixture, method, nfe, shift=1.0, **opts):
    m, x1, ref = mixture
    S = fastint.Sampler(FlowMatch(shift), method, nfe, grid="uniform", **opts)
    calls = []

    def model(x, s):
        calls.append(float(s[0]))
        return m.v(x, float(s[0])).float()

    out = S.sample(model, x1.float())
    assert len(calls) == nfe and calls[0] == 1.0
    return float(((out.double() - ref) ** 2).mean().sqrt())


@pytest.mark.parametrize("method,opts,nfe,bound", [
    ("euler", {}, 200, 0.03),
    ("conj_ms", {"k": 2}, 60, 6e-3),
    ("conj_ms", {"k": 3}, 60, 1.5e-3),
    ("conj_ms", {"k": 2, "corrector": "every"}, 60, 5e-3),
])
def test_sampler_matches_dop853(mixture, method, opts, nfe, bound):
    """Exactly nfe calls, and close to the DOP853 solution of the exact flow ODE."""
    assert _sampler_error(mixture, method, nfe, **opts) < bound


@pytest.mark.parametrize("opts,low", [({"k": 2}, 1.7), ({"k": 3, "corrector": "start"}, 2.7),
                                      ({"k": 2, "interp": "sigma"}, 1.7)])
def test_sampler_orders(mixture, opts, low):
    """Measured slopes of log error against log NFE (20 → 80 calls)."""
    e = [_sampler_error(mixture, "conj_ms", n, **opts) for n in (20, 80)]
    assert math.log(e[0] / e[1]) / math.log(4) > low, e


def test_sampler_prediction_x0_equals_flow(mixture):
    m, x1, _ = mixture
    a = fastint.Sampler(FlowMatch(3.0), "conj_ms", 12, k=2).sample(lambda x, s: m.v(x, float(s[0])).float(), x1.float())
    b = fastint.Sampler(FlowMatch(3.0), "conj_ms", 12, k=2, prediction="x0").sample(
        lambda x, s: m.x0(x, float(s[0])).float(), x1.float())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sampler_explicit_sigmas_ending_at_zero(mixture):
    """An explicit grid ending in 0 is diffusers' convention: N + 1 sigmas, N calls, last step to x̂0."""
    m, x1, _ = mixture
    sig = flow_grid(FlowMatch(), "uniform", 7, 1e-3)
    a = fastint.Sampler(FlowMatch(), "euler", grid=torch.cat([sig, torch.zeros(1, dtype=F64)]))
    b = fastint.Sampler(FlowMatch(), "euler", nfe=8, grid="uniform")
    assert a.nfe == 8
    model = lambda x, s: m.v(x, float(s[0])).float()  # noqa: E731
    torch.testing.assert_close(a.sample(model, x1.float()), b.sample(model, x1.float()))


def test_tiny_sigmas_and_odd_grids_are_clear_errors():
    with pytest.raises(ValueError, match="t_eps"):
        fastint.Sampler(FlowMatch(), "conj_ms", 10, t_eps=1e-9)
    with pytest.raises(ValueError, match="sigmas"):
        flow_table([1.0, 0.5, 1e-12], "euler")
    with pytest.raises(ValueError, match="1-D"):
        fastint.Sampler(FlowMatch(), "conj_ms", grid=torch.tensor(0.5))


def test_scheduler_one_dimensional_sample():
    """A 1-D sample (no batch axis) steps as diffusers' FlowMatch Euler does."""
    a, b = FlowMatchConjugateScheduler(solver_order=1, corrector=False), FlowMatchEulerDiscreteScheduler()
    x0 = torch.randn(7)
    outs = []
    for s in (a, b):
        s.set_timesteps(5)
        x = torch.randn(7, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps:
            x = s.step((x - x0) / (t / 1000), t, x).prev_sample
        outs.append(x)
    assert outs[0].shape == (7,)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_sampler_flow_errors():
    with pytest.raises(ValueError, match="method"):
        fastint.Sampler(FlowMatch(), "em", 10)
    with pytest.raises(ValueError, match="prediction"):
        fastint.Sampler(FlowMatch(), "euler", 10, prediction="eps")
    with pytest.raises(ValueError, match="grid"):
        fastint.Sampler(FlowMatch(), "euler", 10, grid="nope")


# --------------------------------------------------------------------------- the diffusers scheduler
diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from fastint.diffusers import FlowMatchConjugateScheduler  # noqa: E402


def _run(sched, model, x, n=None, **kw):
    sched.set_timesteps(n, **kw)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


CONFIGS = [
    {"shift": 1.0}, {"shift": 3.0}, {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 3.0, "use_exponential_sigmas": True}, {"shift": 2.0, "use_beta_sigmas": True},
    {"shift": 3.0, "shift_terminal": 0.1}, {"use_dynamic_shifting": True, "shift": 3.0},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"shift": 3.0, "invert_sigmas": True},
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("n", [1, 4, 13])
def test_scheduler_order1_is_flowmatch_euler(mixture, cfg, n):
    """solver_order=1 without the corrector reproduces FlowMatchEulerDiscreteScheduler: same sigmas, timesteps, samples."""
    m, x1, _ = mixture
    kw = {"mu": 1.1} if cfg.get("use_dynamic_shifting") else {}
    base = FlowMatchEulerDiscreteScheduler(**cfg)
    ours = FlowMatchConjugateScheduler.from_config(base.config, solver_order=1, corrector=False)
    sign = -1.0 if cfg.get("invert_sigmas") else 1.0
    if n == 1 and "shift_terminal" in cfg:  # diffusers stores sigmas [nan, 0] here (0/0); we refuse
        with pytest.raises(ValueError):
            ours.set_timesteps(n, **kw)
        return

    def model(x, t):
        return sign * m.v(x.double(), 1 - float(t) / 1000 if sign < 0 else float(t) / 1000).float()

    a = _run(FlowMatchEulerDiscreteScheduler.from_config(base.config), model, x1.float(), n, **kw)
    b = _run(ours, model, x1.float(), n, **kw)
    ref = FlowMatchEulerDiscreteScheduler.from_config(base.config)
    ref.set_timesteps(n, **kw)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)


def test_scheduler_custom_sigmas_and_begin_index(mixture):
    """Flux's call (sigmas=linspace, mu, set_begin_index(0)) and img2img (begin_index > 0, scale_noise)."""
    m, x1, _ = mixture
    cfg = {"use_dynamic_shifting": True, "shift": 3.0}
    sig = np.linspace(1.0, 1 / 9, 9)
    model = lambda x, t: m.v(x.double(), float(t) / 1000).float()  # noqa: E731
    outs = []
    for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchConjugateScheduler):
        s = cls(**cfg, **({"solver_order": 1, "corrector": False} if cls is FlowMatchConjugateScheduler else {}))
        s.set_timesteps(sigmas=sig, mu=0.9)
        s.set_begin_index(3)
        x = s.scale_noise(x1.float(), s.timesteps[3:4], torch.randn(x1.shape, generator=torch.Generator().manual_seed(2)))
        for t in s.timesteps[3:]:
            x = s.step(model(x, t), t, x).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=5e-5)


def test_scheduler_default_beats_euler(mixture):
    """The default (second order) is more accurate than Euler at 20 steps on the mixture."""
    m, x1, ref = mixture
    model = lambda x, t: m.v(x.double(), float(t) / 1000).float()  # noqa: E731
    e_euler = (_run(FlowMatchEulerDiscreteScheduler(shift=1.0), model, x1.float(), 20).double() - ref).norm()
    e_ours = (_run(FlowMatchConjugateScheduler(shift=1.0), model, x1.float(), 20).double() - ref).norm()
    assert e_ours < 0.6 * e_euler


def test_scheduler_config_both_ways():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.4)
    ours = FlowMatchConjugateScheduler.from_config(base.config)
    assert ours.config.shift == 3.0 and ours.config.use_dynamic_shifting and ours.config.base_shift == 0.4
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 3.0 and back.config.base_shift == 0.4
    assert ours.init_noise_sigma == 1.0 and ours.order == 1 and ours.step_index is None and ours.begin_index is None
    ours.set_shift(5.0)
    assert ours.shift == 5.0


def test_scheduler_from_other_configs():
    """A UniPC flow config (Wan's) maps flow_shift to shift; a DDPM-style config is refused."""
    u = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0)
    assert FlowMatchConjugateScheduler.from_config(u.config).config.shift == 5.0
    with pytest.raises(ValueError, match="flow-matching"):
        FlowMatchConjugateScheduler.from_config(diffusers.DDPMScheduler().config)


def test_scheduler_errors():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchConjugateScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="solver_order"):
        FlowMatchConjugateScheduler(solver_order=4)
    with pytest.raises(TypeError, match="corrector"):
        FlowMatchConjugateScheduler(corrector="yes")
    with pytest.raises(ValueError, match="interp"):
        FlowMatchConjugateScheduler(interp="t")
    s = FlowMatchConjugateScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(4)
    s = FlowMatchConjugateScheduler()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, torch.tensor(1000.0), x)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        s.step(x, 3, x)
    with pytest.raises(ValueError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="shift"):
        s.set_shift(0.0)
    # a VP scheduler refuses a flow config, and this one a DDPM config key it cannot honour
    with pytest.raises(ValueError, match="flow-matching"):
        fastint.diffusers.ConjugateMultistepScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
