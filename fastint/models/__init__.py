"""Models that follow fastint's call convention `model(z, t) -> eps` (SPEC §2)."""
from .mixture import GaussianMixture, reference_solution, tweedie_reference

__all__ = ["GaussianMixture", "reference_solution", "tweedie_reference"]
