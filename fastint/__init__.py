"""fastint: fast sampling for diffusion models.

Conjugate and splitting integrators (Pandey, Rudolph, Mandt, ICLR 2024) as per-step
affine tables computed once in float64 (C++), applied by one fused torch op
(Triton on CUDA, C++ on CPU), and composed by a thin Python sampler around any model.
"""
from . import _ext

_ext.load()

from .processes import CLD, PSLD, VPSDE  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the CUDA kernel and the fake kernels)
from .methods import METHODS, check_extension as _check_extension  # noqa: E402
from . import grids  # noqa: E402,F401
from .table import Table, make_table  # noqa: E402
from .coefficients import build_table  # noqa: E402
from .flow import FlowMatch  # noqa: E402
from .sampler import Sampler, sample  # noqa: E402
from . import seeding  # noqa: E402,F401
from . import models  # noqa: E402,F401

_check_extension()  # the registry and the C++ method list agree (fastint/methods.py)

__version__ = "0.1.0"
__all__ = ["VPSDE", "PSLD", "CLD", "FlowMatch", "Sampler", "sample", "build_table", "make_table", "Table", "grids", "METHODS", "ops", "models"]
