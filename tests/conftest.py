"""Shared pytest setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is
read when @triton.jit decorates a kernel, so it is set here, before any test module
imports fastint.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="long property runs: tests/test_properties.py draws more than 10,000 cases in all "
                          "(a few hundred without it)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_kernel: runs the C++ CPU kernel of torch.ops.fastint.step (csrc/step_cpu.cpp)"
    )
