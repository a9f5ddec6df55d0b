"""The embedded real dataset: scikit-learn's 8x8 handwritten digits (1797 images, no download).

Pixels are integers 0..16; they are mapped to [-1, 1] by x / 8 - 1 and kept at 8x8, one
channel: [N, 1, 8, 8] float32. A fixed split (a seed-0 permutation) holds out 297 images
for evaluation (denoising PSNR, classifier accuracy); models and the classifier train on
the other 1500. Fréchet distances use all 1797 as the reference set.
"""
import torch

N_TEST = 297
DATA_SHAPE = (1, 8, 8)
SPLITS = ("train", "test", "all")


def load_digits(split="train"):
    """Digits as float32 [N, 1, 8, 8] in [-1, 1] and int64 labels [N]; split is train/test/all."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(it is in fastint's `demo` and `test` extras)") from e
    d = _sk_load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).reshape(-1, *DATA_SHAPE) / 8.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if split == "all":
        return x, y
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = perm[:N_TEST] if split == "test" else perm[N_TEST:]
    return x[idx], y[idx]


def to_uint8(x):
    """Images in [-1, 1] -> uint8 0..255 (clamped)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
