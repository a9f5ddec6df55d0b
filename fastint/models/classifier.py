"""A small CNN digit classifier whose penultimate features define fastint's Fréchet distance.

Input: digits [B, 1, 8, 8] in [-1, 1] (fastint.data). Three 3x3 convs with GroupNorm and
SiLU (8x8 -> 4x4 by average pooling), global average pooling, a 64-d feature vector,
then a linear layer to 10 logits. `features(x)` returns the 64-d vectors.
"""
from torch import nn
from torch.nn import functional as F

from .layers import check_int, group_norm


class DigitClassifier(nn.Module):
    """logits = classifier(x) for x [B, in_channels, H, W]; `features(x)` is the penultimate layer."""

    arch = "DigitClassifier"

    def __init__(self, in_channels=1, width=32, feature_dim=64, num_classes=10):
        super().__init__()
        self.config = dict(in_channels=check_int("in_channels", in_channels), width=check_int("width", width),
                           feature_dim=check_int("feature_dim", feature_dim),
                           num_classes=check_int("num_classes", num_classes, low=2))
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm1 = group_norm(width, 8)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm2 = group_norm(2 * width, 8)
        self.conv3 = nn.Conv2d(2 * width, feature_dim, 3, padding=1)
        self.norm3 = group_norm(feature_dim, 8)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """Penultimate features [B, feature_dim]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.avg_pool2d(F.silu(self.norm2(self.conv2(h))), 2)
        h = F.silu(self.norm3(self.conv3(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))
