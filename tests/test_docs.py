"""The Python examples in README.md and docs/*.md run against the code as it is.

Each ```python block is executed statement by statement in a namespace of small stand-ins for
the names an example assumes (``model``, ``x``, ``sigmas``, ...; ``pipe`` is a pipeline-shaped
stand-in whose call sets its scheduler's timesteps as a diffusers pipeline does). Statements
that need what this machine cannot have (a pipeline from the hub, NCCL) are skipped; every other
statement runs, so a wrong option name or value in an example fails here.
"""
import ast
import pathlib
import re
import types

import pytest
import torch

import fastint

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# statements that need a hub pipeline or a process group
OFFLINE_SKIP = ("from_pretrained", "init_process_group", "distributed.generate")


class _Pipe:
    """What a diffusers pipeline's __call__ does with its scheduler: set_timesteps with the
    steps or the timesteps it is given (diffusers' retrieve_timesteps), then the loop."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __call__(self, prompt=None, num_inference_steps=50, timesteps=None, **kwargs):
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps)
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        self.called_with = (num_inference_steps, timesteps)
        return types.SimpleNamespace(images=[None])


def _blocks():
    for path in DOCS:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(m.group(1), id=f"{path.name}-{i}")


def _namespace(code):
    """Stand-ins for the names the examples take from their context."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if "k_diffusion" in code:  # a k-diffusion denoiser D(x, sigma, **extra_args)
        def model(x, sigma, **kw):
            return x / (1 + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2)
    else:  # a fastint model(z, t)
        def model(z, t):
            return 0.1 * z
    flow = "FlowMatch" in code
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0])
    return {
        "torch": torch, "fastint": fastint, "model": model, "sde": fastint.VPSDE(),
        "pipe": _Pipe(FlowMatchEulerDiscreteScheduler() if flow else DPMSolverMultistepScheduler()),
        "prompt": "a digit",
        "x": torch.randn(2, 3, 8, 8) * 10.0, "noise": torch.randn(2, 3, 8, 8), "sigmas": sigmas,
        "extra_args": {}, "callback": None, "cb": None, "c": None, "disable": True,
    }


def test_the_docs_have_examples():
    assert len(list(_blocks())) >= 8


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code):
    tree = ast.parse(code)  # a syntax error fails here
    ns, ran = _namespace(code), 0
    for stmt in tree.body:
        src = ast.get_source_segment(code, stmt)
        if any(s in src for s in OFFLINE_SKIP):
            continue
        exec(compile(ast.Module([stmt], type_ignores=[]), "<doc example>", "exec"), ns)
        ran += 1
    assert ran >= 1
    if "pipe.scheduler =" in code:  # the drop-in swap happened
        assert type(ns["pipe"].scheduler).__module__ == "fastint.diffusers"
    if "timesteps=" in code:  # the pipeline's timesteps reached the scheduler
        assert ns["pipe"].called_with[1] is not None
        assert ns["pipe"].scheduler.timesteps.tolist() == [int(t) for t in ns["pipe"].called_with[1]]
