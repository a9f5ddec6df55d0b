"""Loads the compiled extension fastint._C and refuses to run with a missing or stale one."""
import hashlib
import os

import torch

BUILD_HINT = (
    "Build it against the installed torch with `make build` "
    "(or: pip install --no-build-isolation -e .)."
)

_PKG = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_PKG), "csrc")


def _source_hash(csrc):
    """Same hash as setup.py: the build records it, a source checkout recomputes it."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(csrc) if n.endswith((".cpp", ".h")))
    for name in names:
        with open(os.path.join(csrc, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def load():
    if not any(n.startswith("_C.") and n.endswith((".so", ".pyd")) for n in os.listdir(_PKG)):
        raise ImportError(f"fastint's compiled extension fastint._C is not built. {BUILD_HINT}")
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastint.*)
    except ImportError as e:
        raise ImportError(f"fastint's compiled extension fastint._C failed to load ({e}). {BUILD_HINT}") from e
    built_hash, built_torch = torch.ops.fastint.build_info().split(" ", 1)
    if built_torch != torch.__version__:
        raise ImportError(
            f"fastint._C was built against torch {built_torch}, but torch {torch.__version__} is installed. {BUILD_HINT}"
        )
    if os.path.isdir(_CSRC) and built_hash != _source_hash(_CSRC):
        raise ImportError(f"fastint._C is stale: csrc/ changed since it was built. {BUILD_HINT}")
