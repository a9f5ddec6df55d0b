"""What installing fastint asks of a user's environment: the requirements in pyproject.toml,
CPU use without triton, the k-diffusion tests skipping without k-diffusion, a visible build."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
needs_source = pytest.mark.skipif(not os.path.exists(PYPROJECT), reason="needs the source checkout")


def _pyproject():
    import tomllib
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


def _run(code, *args, timeout=600):
    """``code`` in a fresh interpreter (args in sys.argv[1:]), from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@needs_source
def test_requirements_fit_a_users_torch():
    """torch has a lower bound only, the one the code needs; triton is only in the gpu extra."""
    project = _pyproject()["project"]
    deps = {re.split(r"[<>=!~ ;\[]", d, 1)[0]: d for d in project["dependencies"]}
    assert deps["torch"].replace(" ", "") == "torch>=2.4"
    assert "triton" not in deps
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["gpu"])
    assert hasattr(torch.library, "register_fake")  # the 2.4 API fastint/ops uses
    assert project["version"] == fastint.__version__


@needs_source
def test_readme_states_the_requirement_and_the_tested_torch():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "`torch>=2.4`" in readme and "Only torch 2.13.0 (CPU) has been tested" in readme
    assert "pip install -v --no-build-isolation -e \".[test]\"" in readme


HIDE_TRITON = "import sys; sys.modules['triton'] = None\n"


def test_cpu_sampling_without_triton(tmp_path):
    """With triton unimportable, `import fastint` works and CPU sampling gives the same samples;
    the CUDA kernel's stand-in raises an error that names triton."""
    code = HIDE_TRITON + """
import torch, fastint
from fastint.models import GaussianMixture
try:
    import triton
    raise SystemExit('triton was not hidden')
except ImportError:
    pass
sde = fastint.PSLD()
model = GaussianMixture.default(sde)
zT = sde.prior_sample((32, *model.data_shape), generator=torch.Generator().manual_seed(0))
x = fastint.Sampler(sde, "cspss", nfe=6).sample(model, zT, generator=torch.Generator().manual_seed(1))
torch.save(x, sys.argv[1])
try:
    fastint.ops.step_triton(None)
except RuntimeError as e:
    print('RAISED', e)
"""
    r = _run(code, tmp_path / "x.pt")
    assert r.returncode == 0, r.stderr
    assert "RAISED fastint::step on CUDA needs triton" in r.stdout
    x = torch.load(tmp_path / "x.pt", weights_only=True)
    sde = fastint.PSLD()
    model = fastint.models.GaussianMixture.default(sde)
    zT = sde.prior_sample((32, *model.data_shape), generator=torch.Generator().manual_seed(0))
    ref = fastint.Sampler(sde, "cspss", nfe=6).sample(model, zT, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_cli_without_triton():
    r = _run(HIDE_TRITON + "from fastint.cli import main\nmain(['--version'])")
    assert r.returncode == 0, r.stderr
    assert "no triton (CPU only)" in r.stdout


@needs_source
def test_k_diffusion_tests_skip_without_k_diffusion():
    """tests/test_k_diffusion.py is skipped, not a collection error, when k-diffusion is absent."""
    code = """
import sys
sys.modules['k_diffusion'] = None  # importlib.util.find_spec now returns None, as when not installed
import pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', 'tests/test_k_diffusion.py']))
"""
    r = _run(code)
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: nothing left to run (a collection error is 2)
    assert re.search(r"\b1 skipped\b", r.stdout) and "error" not in r.stdout.lower(), r.stdout
    assert "k-diffusion is not installed" in r.stdout


@needs_source
def test_setup_says_that_it_compiles():
    """The build announces itself (seen with pip install -v): a few minutes with no output otherwise."""
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    n = len([f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cpp")])
    assert f"fastint: compiling fastint._C ({n} C++ files) against torch {torch.__version__}" in r.stderr


@needs_source
def test_the_suite_collects_without_the_optional_peers():
    """With diffusers, transformers, tokenizers, scikit-learn, k-diffusion and triton all hidden,
    collecting tests/ gives skips, not errors (a CPU-only install with only the core requirements)."""
    code = """
import sys
for name in ('diffusers', 'transformers', 'tokenizers', 'sklearn', 'k_diffusion', 'triton'):
    sys.modules[name] = None
import pytest
sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-rs', 'tests']))
"""
    r = _run(code)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.lower().split("short test summary")[-1], r.stdout[-3000:]
    for module in ("test_diffusers.py", "test_k_diffusion.py", "test_step_op.py", "test_train.py"):
        assert re.search(rf"SKIPPED \[1\] tests/{module}", r.stdout), module
