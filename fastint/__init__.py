"""fastint: fast sampling for diffusion models.

Conjugate and splitting integrators (Pandey, Rudolph, Mandt, ICLR 2024) as per-step
affine tables computed once in float64 (C++), applied by one fused torch op
(Triton on CUDA, C++ on CPU), and composed by a thin Python sampler around any model.
"""
from . import _ext

_ext.load()

from .processes import CLD, PSLD, VPSDE  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the CUDA kernel and the fake kernels)
from .coefficients import METHODS, build_table  # noqa: E402
from .sampler import Sampler, sample  # noqa: E402
from . import models  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["VPSDE", "PSLD", "CLD", "Sampler", "sample", "build_table", "METHODS", "ops", "models"]
