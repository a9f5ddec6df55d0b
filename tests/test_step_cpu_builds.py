"""The CPU step kernel is compiled three times (x86-64, AVX2, AVX-512) and picked at run time
from torch's CPU capability. Every build must give bit-identical results, so each is run
in a subprocess under ATEN_CPU_CAPABILITY and compared with this process's output."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import sys, torch, fastint
from fastint.ops import step
inputs = torch.load(sys.argv[1])  # made once by the parent: torch.randn itself differs across capabilities
out = {}
for key, (z, eps, coef, noise) in inputs.items():
    out[key] = [step(z, eps, coef, 2, 2, seed=7, offset=11), step(z, eps[:1], coef, 1, 1),
                step(z, eps, coef, 0, 2, noise=noise),
                step(z, eps[:1], coef, 2, 1, seed=5, offset=-7),  # dim-1 normals: short strided runs
                step(z.contiguous(), eps, coef, 2, 1, seed=5, offset=2**32 - 333),  # long runs
                step(z.contiguous(), eps, coef, 2, 2, seed=5, offset=-101)]  # pairs across the wrap
torch.save(out, sys.argv[2])
"""


def _inputs(path):
    g = torch.Generator().manual_seed(3)
    inputs = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = torch.randn(3, 10, 7, 9, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        eps = [torch.randn(3, 10, 7, 9, generator=g).to(dtype) for _ in range(2)]
        inputs[str(dtype)] = (z, eps, torch.randn(4, 7 + 8, generator=g), torch.randn(z.shape, generator=g))
    torch.save(inputs, path)


def _run(capability, inputs, path):
    env = dict(os.environ)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    subprocess.run([sys.executable, "-c", SCRIPT, str(inputs), str(path)], check=True, env=env)
    return torch.load(path)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_builds_are_bit_identical(tmp_path, capability):
    _inputs(tmp_path / "inputs.pt")
    native = _run(None, tmp_path / "inputs.pt", tmp_path / "native.pt")
    other = _run(capability, tmp_path / "inputs.pt", tmp_path / f"{capability}.pt")
    for key, tensors in native.items():
        for a, b in zip(tensors, other[key]):
            assert torch.equal(a, b), (key, capability)
