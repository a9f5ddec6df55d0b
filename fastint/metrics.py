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
