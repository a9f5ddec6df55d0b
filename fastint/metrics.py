"""Distances between sample sets, for judging samplers against exact data."""
import torch


def sliced_wasserstein(a, b, n_projections=256, generator=None):
    """Sliced 2-Wasserstein distance between two equally sized sample sets [n, ...].

    The mean over random unit directions of the exact 1-D W2 between the projected sets
    (sorted matching), square-rooted. Computed in float64.
    """
    a = torch.as_tensor(a).to(torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b).to(torch.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same number of points of the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    dirs = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


_CLASSIFIER = None
FEATURES = ("classifier", "pixels")


def digit_classifier():
    """The shipped digit classifier (fastint/checkpoints/classifier_digits.pt), loaded once, eval mode."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from .models.checkpoint import load_checkpoint
        _CLASSIFIER = load_checkpoint("classifier", arch="DigitClassifier").model.requires_grad_(False)
    return _CLASSIFIER


def _features(x, features, classifier, name, min_items=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim < 2 or len(x) < min_items:
        raise ValueError(f"{name} must be a batch of at least {min_items} items, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    if features == "pixels":
        return x.to(torch.float64).reshape(len(x), -1)
    net = digit_classifier() if classifier is None else classifier
    if x.ndim != 4:
        raise ValueError(f"{name} must be images [N, C, H, W] for classifier features, got shape {tuple(x.shape)}")
    with torch.no_grad():
        return torch.cat([net.features(c.float()) for c in x.split(1024)]).to(torch.float64)


def _sqrtm_psd(S):
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt()) @ V.mT


def frechet_distance(samples, reference, features="classifier", classifier=None):
    """Fréchet distance between Gaussians fitted to two sets' features (the FID formula):

        ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½),

    on the penultimate features of the digit classifier (features="classifier"; samples
    and reference are images [N, 1, 8, 8] in [-1, 1]; `classifier` overrides the shipped
    one) or on raw pixels (features="pixels"). Computed in float64; 0 for identical sets.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    a = _features(samples, features, classifier, "samples")
    b = _features(reference, features, classifier, "reference")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples and reference have different feature sizes {a.shape[1]} and {b.shape[1]}")
    ca, cb = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    return _frechet_gaussians(a.mean(0), ca, b.mean(0), cb)


def _frechet_gaussians(mu_a, ca, mu_b, cb):
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), in float64."""
    ra = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(ra @ cb @ ra).clamp_min(0).sqrt().sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + torch.trace(ca) + torch.trace(cb) - 2.0 * cross)
    return max(fd, 0.0)  # >= 0 exactly; rounding of zero-variance directions can give -1e-10


def feature_stats(x, features="classifier", classifier=None):
    """Sufficient statistics of a set's features for the Fréchet distance: (n, Σ f, Σ f fᵀ), in
    float64. They add up over disjoint parts (shards, ranks), so a distributed job reduces them
    with one all_reduce and gets the statistics of the whole set (fastint.distributed)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    f = _features(x, features, classifier, "samples", min_items=1)  # a shard may hold one sample
    return len(f), f.sum(0), f.T @ f


def frechet_from_stats(a, b):
    """The Fréchet distance between the Gaussians of two feature statistics (n, Σ f, Σ f fᵀ)
    (feature_stats): mean Σf/n, unbiased covariance (Σffᵀ − n μμᵀ)/(n − 1)."""
    def moments(s):
        n, s1, s2 = s
        if n < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {n}")
        mu = s1 / n
        return mu, (s2 - n * torch.outer(mu, mu)) / (n - 1)

    (mu_a, ca), (mu_b, cb) = moments(a), moments(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"the two sets have different feature sizes {mu_a.numel()} and {mu_b.numel()}")
    return _frechet_gaussians(mu_a, (ca + ca.T) / 2, mu_b, (cb + cb.T) / 2)
