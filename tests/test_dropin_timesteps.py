"""fastint's multistep drop-in schedulers choose exactly the timesteps and sigmas of diffusers'
DPMSolverMultistepScheduler.

``ConjugateMultistepScheduler.from_config(cfg)`` and ``LambdaDDIMScheduler.from_config(cfg)``, after
``set_timesteps(n)`` (or ``set_timesteps(timesteps=[...])``), must have

- ``.timesteps`` equal (``torch.equal``) to ``DPMSolverMultistepScheduler.from_config(cfg)``'s;
- ``.sigmas`` (σ/α per step, then the final σ) equal to its ``.sigmas`` to float32 rounding
  (rtol 1e-6, atol 0, compared in float64, same length).

Grid: two configs (DDPM linear 1e-4..0.02; Stable Diffusion scaled_linear 0.00085..0.012 with
steps_offset=1), every ``timestep_spacing`` (leading with steps_offset 0 and 1), plain, Karras,
exponential and beta sigmas, ``final_sigmas_type`` zero and sigma_min (timesteps: zero only, since
diffusers' final_sigmas_type changes only the last sigma), and step counts 1..999.
A case is skipped where diffusers' own schedule is not valid: its set_timesteps raises, or a
timestep leaves [0, num_train_timesteps) (leading spacing, steps_offset=1, 999 steps gives 1000).
diffusers' schedule is kept as it is otherwise, repeated timesteps included: Karras, exponential
and beta sigmas round distinct sigmas to the same integer timestep at 999 steps, and already at
20-50 steps on some configs (e.g. SD, exponential, 20 steps).

The reference is computed once per case and shared by the tests of both classes.
"""
import functools

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from fastint.diffusers import ConjugateMultistepScheduler, LambdaDDIMScheduler  # noqa: E402

N_TRAIN = 1000
CONFIGS = {
    "ddpm": dict(num_train_timesteps=N_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "sd": dict(num_train_timesteps=N_TRAIN, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               clip_sample=False, set_alpha_to_one=False, steps_offset=1),
}
# linspace and trailing keep the config's steps_offset (1 on SD): diffusers ignores it there
SPACINGS = {
    "linspace": dict(timestep_spacing="linspace"),
    "leading-off0": dict(timestep_spacing="leading", steps_offset=0),
    "leading-off1": dict(timestep_spacing="leading", steps_offset=1),
    "trailing": dict(timestep_spacing="trailing"),
}
SIGMAS = {
    "plain": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
}
FINALS = ("zero", "sigma_min")
STEPS = (1, 2, 5, 7, 10, 20, 25, 50, 999)
CLASSES = {"conj_ms": ConjugateMultistepScheduler, "lambda_ddim": LambdaDDIMScheduler}

CUSTOM = {
    "ays-sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "one": [999],
    "to-zero": [999, 500, 0],
    "adjacent": [800, 799, 798, 400],
    "uneven": [961, 700, 450, 151, 3],
}

RTOL = 1e-6

# diffusers' own np.interp on a torch tensor, under numpy 2 (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(cfg, spacing, sigmas, final):
    return {**CONFIGS[cfg], **SPACINGS[spacing], **SIGMAS[sigmas], "final_sigmas_type": final}


@functools.lru_cache(maxsize=None)
def _reference(cfg, spacing, sigmas, final, n):
    """diffusers' (timesteps, sigmas) for this case, or a string saying why the case is not valid."""
    ref = DPMSolverMultistepScheduler.from_config(_config(cfg, spacing, sigmas, final))
    try:
        ref.set_timesteps(n)
    except Exception as e:  # noqa: BLE001  (diffusers itself refuses the case)
        return f"diffusers' set_timesteps({n}) raises {e!r}"
    ts = ref.timesteps
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= N_TRAIN:
        return f"diffusers' timesteps leave [0, {N_TRAIN}): [{int(ts.min())}, {int(ts.max())}]"
    if not torch.isfinite(ref.sigmas).all():
        return "diffusers' sigmas are not finite"
    return ref.timesteps.clone(), ref.sigmas.clone()


def _need_scipy(sigmas):
    if sigmas == "beta":
        pytest.importorskip("scipy")  # diffusers' beta sigmas use scipy.stats.beta


def _fail(msg):
    # a plain raise, not an assert: pytest's rewriting would print the scheduler's whole config
    # and both tensors for each of the ~1700 cases
    __tracebackhide__ = True
    raise AssertionError(msg)


def _check_timesteps(sch, ref_ts):
    __tracebackhide__ = True
    got = sch.timesteps
    if not isinstance(got, torch.Tensor):
        _fail(f".timesteps is a {type(got).__name__}, not a tensor")
    if not torch.equal(got.cpu(), ref_ts):
        _fail(f"timesteps differ (len {got.numel()} vs {ref_ts.numel()}):\n got {got.tolist()}\n"
              f" ref {ref_ts.tolist()}")


def _check_sigmas(sch, ref_sigmas):
    __tracebackhide__ = True
    if not hasattr(sch, "sigmas"):
        _fail(f"{type(sch).__name__} has no .sigmas")
    got = torch.as_tensor(sch.sigmas).detach().cpu().to(torch.float64)
    ref = ref_sigmas.to(torch.float64)
    if got.shape != ref.shape:
        _fail(f"sigmas have shape {tuple(got.shape)}, diffusers' {tuple(ref.shape)}")
    close = torch.isclose(got, ref, rtol=RTOL, atol=0.0)
    if not bool(close.all()):
        i = int((~close).nonzero()[0])
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
        _fail(f"sigmas differ at {int((~close).sum())} of {ref.numel()} entries "
              f"(first at index {i}: {got[i].item():.9g} vs {ref[i].item():.9g}; max rel {rel:.3g})")


CASES = [(c, sp, sg, f, n) for c in CONFIGS for sp in SPACINGS for sg in SIGMAS for f in FINALS for n in STEPS]
# final_sigmas_type changes only the last sigma in diffusers, not the timesteps: one final suffices there
TIMESTEP_CASES = [case for case in CASES if case[3] == "zero"]


def _case_id(case):
    c, sp, sg, f, n = case
    return f"{c}-{sp}-{sg}-final_{f}-{n}steps"


def _setup(cls_name, case):
    cfg, spacing, sigmas, final, n = case
    _need_scipy(sigmas)
    ref = _reference(*case)
    if isinstance(ref, str):
        pytest.skip(ref)
    sch = CLASSES[cls_name].from_config(_config(cfg, spacing, sigmas, final))
    sch.set_timesteps(n)
    return sch, ref


@pytest.mark.parametrize("case", TIMESTEP_CASES, ids=_case_id)
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_timesteps_match_dpmsolver(cls_name, case):
    sch, (ref_ts, _) = _setup(cls_name, case)
    _check_timesteps(sch, ref_ts)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_sigmas_match_dpmsolver(cls_name, case):
    sch, (_, ref_sigmas) = _setup(cls_name, case)
    _check_sigmas(sch, ref_sigmas)


# --------------------------------------------------------------------------- explicit timesteps
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("custom", list(CUSTOM))
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_custom_timesteps_match_dpmsolver(cls_name, custom, cfg, final):
    """set_timesteps(timesteps=[...]): the given timesteps, and diffusers' sigmas interpolated at them
    (diffusers refuses explicit timesteps with Karras, exponential or beta sigmas, so plain only)."""
    config = {**CONFIGS[cfg], "final_sigmas_type": final}
    ts = CUSTOM[custom]
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(timesteps=list(ts))
    sch = CLASSES[cls_name].from_config(config)
    sch.set_timesteps(timesteps=list(ts))
    assert torch.equal(ref.timesteps, torch.tensor(ts, dtype=torch.int64))  # the reference itself
    _check_timesteps(sch, ref.timesteps)
    _check_sigmas(sch, ref.sigmas)

