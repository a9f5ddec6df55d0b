"""Fréchet distance on the shipped classifier's features and on pixels."""
import pytest
import torch

from fastint.data import load_digits
from fastint.metrics import digit_classifier, frechet_distance

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return load_digits("test")


def test_gaussian_closed_form():
    """Two large Gaussian samples with known moments: FD -> ‖Δμ‖² + Σ(σ₁ − σ₂)² (commuting covariances)."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64) + 1.0
    exact = 3 * 1.0 + (1 - 2) ** 2 + 0 + (0.5 - 1) ** 2
    assert frechet_distance(a, b, features="pixels") == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("features", ["classifier", "pixels"])
def test_zero_for_identical_sets_and_grows_with_noise(digits, features):
    x = digits[0]
    assert abs(frechet_distance(x, x, features=features)) < 1e-8
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    fds = [frechet_distance(x + s * noise, x, features=features) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[0] > 0


def test_classifier_is_accurate_on_held_out_digits():
    x, y = load_digits("test")
    with torch.no_grad():
        acc = (digit_classifier()(x).argmax(1) == y).float().mean()
    assert acc > 0.95


def test_bad_inputs():
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="features must be one of"):
        frechet_distance(x, x, features="inception")
    with pytest.raises(TypeError, match="samples must be a tensor"):
        frechet_distance([1, 2], x)
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(torch.zeros(4, 10), torch.zeros(4, 12), features="pixels")
    with pytest.raises(ValueError, match="reference must be finite"):
        frechet_distance(x, torch.full((4, 1, 8, 8), float("nan")))
