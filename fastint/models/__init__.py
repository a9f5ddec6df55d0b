"""Models that follow fastint's call convention `model(z, t) -> eps` (docs/design.md, "Processes")."""
from .mixture import GaussianMixture, reference_solution, tweedie_reference
from .continuous_unet import ContinuousUNet
from .unet import UNet
from .classifier import DigitClassifier
from .checkpoint import load_checkpoint, load_pretrained, save_checkpoint

__all__ = ["GaussianMixture", "reference_solution", "tweedie_reference", "ContinuousUNet", "UNet",
           "DigitClassifier", "load_checkpoint", "load_pretrained", "save_checkpoint"]
