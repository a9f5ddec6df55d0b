"""Builds fastint._C, the C++ extension (coefficient tables and the CPU step kernel).

Build against the torch that is already installed:  pip install -v --no-build-isolation -e .
(-v shows the compiler's progress; without it pip prints nothing for the few minutes the build takes.)
"""
import glob
import hashlib
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only hit by a mis-configured build
    sys.exit(
        "fastint builds against an installed torch. Install it first "
        "(pip install 'torch>=2.4'), then build with: pip install -v --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
headers = sorted(glob.glob(os.path.join("csrc", "*.h")))


def source_hash():
    """Hash of csrc/, compiled in so that `import fastint` can detect a stale build."""
    h = hashlib.sha256()
    for path in sorted(sources + headers):
        with open(os.path.join(HERE, path), "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


# -fno-math-errno: sqrt never sets errno, so loops calling it vectorise (the step kernel's Box-Muller);
# results are unchanged.
flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
         f'-DFASTINT_SRC_HASH="{source_hash()}"',
         f'-DFASTINT_TORCH_VERSION="{torch.__version__}"']

if any(cmd in sys.argv for cmd in ("build_ext", "bdist_wheel", "editable_wheel", "develop", "install")):
    print(f"fastint: compiling fastint._C ({len(sources)} C++ files) against torch {torch.__version__}; "
          "this takes a few minutes", file=sys.stderr, flush=True)

setup(
    ext_modules=[
        CppExtension(
            "fastint._C",
            sources,
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
