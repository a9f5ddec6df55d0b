"""Gaussian-mixture data with the exact score of every perturbed marginal: the test oracle.

A mixture of isotropic Gaussians pushed through a linear process stays a mixture of
Gaussians, per pixel with mean Psi(t,0)(mu_k, 0) and covariance Sigma_t(s_k^2, kappa M)
(docs/results.md, "Method"). Its score is therefore exact, and so is the PF-ODE it defines, which
`reference_solution` solves with scipy's DOP853 in float64.
"""
import math

import numpy as np
import torch
from torch import nn



def _as_float64(name, value, ndim):
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


class GaussianMixture(nn.Module):
    """Exact eps-model of a Gaussian mixture under `sde`: model(z, t) -> eps.

    means: [K, *data_shape] component means; stds: [K] isotropic standard deviations;
    weights: [K] mixture weights (normalised here). The model accepts any batch of states
    [B, dim*C, ...] whose data part has `data_shape`, computes in float64, and returns
    eps in z's dtype.
    """

    def __init__(self, sde, means, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must be [K, *data_shape] with data_shape non-empty, got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = _as_float64("stds", stds, 1)
        weights = _as_float64("weights", torch.ones(k) if weights is None else weights, 1)
        if stds.shape[0] != k or weights.shape[0] != k:
            raise ValueError(f"stds and weights must have K={k} entries, got {stds.shape[0]} and {weights.shape[0]}")
        if not (stds > 0).all():
            raise ValueError("stds must be positive")
        if not (weights > 0).all():
            raise ValueError("weights must be positive")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        self.sde = sde
        self.data_shape = tuple(means.shape[1:])
        self.register_buffer("means", means.reshape(k, -1))
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    # ---- data ----------------------------------------------------------------------
    @classmethod
    def default(cls, sde, dim=2):
        """The built-in demo mixture: 8 well-separated modes on a circle (dim=2) or a
        deterministic random set of 8 modes in `dim` dimensions."""
        g = torch.Generator().manual_seed(0)
        k = 8
        if dim == 2:
            ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
            means = 1.5 * torch.stack([ang.cos(), ang.sin()], 1)
        else:
            means = torch.randn(k, dim, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(dim))
        stds = torch.full((k,), 0.15, dtype=torch.float64)
        weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        return cls(sde, means.reshape(k, dim, 1, 1) if dim == 2 else means.reshape(k, dim), stds, weights)

    def sample_data(self, n, generator=None):
        """n exact draws from the data distribution, float64 [n, *data_shape]."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        return x.reshape(n, *self.data_shape)

    def log_prob(self, x):
        """Exact log-density of data points x [n, *data_shape] (float64)."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        d = x.shape[1]
        var = self.stds**2
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # [n, K]
        logn = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(self.log_weights + logn, dim=1)

    # ---- exact score ---------------------------------------------------------------
    def _components(self, t):
        """Per-sample, per-component marginal mean factor and covariance at time t [B]."""
        sde = self.sde
        d = sde.dim
        psi_col = sde.transition(t, torch.zeros_like(t))[..., :, 0]  # [B, d]
        s0 = torch.zeros(len(self.stds), d, d, dtype=torch.float64)
        s0[:, 0, 0] = self.stds**2
        if d == 2:
            s0[:, 1, 1] = sde.sigma0[1, 1]
        cov = sde.marginal_cov(t[:, None], sigma0=s0[None], jitter=False)  # [B, K, d, d]
        return psi_col, cov

    def _state(self, z):
        d = self.sde.dim
        n = self.means.shape[1]
        if z.ndim < 2 or z.shape[1] % d or z[:, : z.shape[1] // d].flatten(1).shape[1] != n:
            raise ValueError(
                f"z must be a state [B, {d}*C, ...] whose data part has {n} elements (data shape {self.data_shape}), "
                f"got shape {tuple(z.shape)}"
            )
        c = z.shape[1] // d
        parts = [z[:, i * c : (i + 1) * c].reshape(z.shape[0], n) for i in range(d)]
        return torch.stack(parts, -1).to(torch.float64)  # [B, n, d]

    def score(self, z, t):
        """Exact score of the perturbed marginal, float64, shape of z."""
        u = self._state(z)
        t = torch.as_tensor(t, dtype=torch.float64, device=u.device).reshape(-1).expand(u.shape[0])
        psi_col, cov = self._components(t)
        prec, logdet = _inv_logdet(cov)  # [B, K, d, d], [B, K]
        mean = self.means[None, :, :, None] * psi_col[:, None, None, :]  # [B, K, n, d]
        diff = u[:, None] - mean
        pd = torch.einsum("bkij,bknj->bkni", prec, diff)
        quad = (diff * pd).sum((-1, -2))
        n = u.shape[1]
        logn = -0.5 * quad - 0.5 * n * logdet
        resp = torch.softmax(self.log_weights + logn, dim=1)  # [B, K]
        s = -(resp[:, :, None, None] * pd).sum(1)  # [B, n, d]
        return self._unstate(s, z)

    def _unstate(self, u, z):
        d = self.sde.dim
        c = z.shape[1] // d
        parts = [u[..., i].reshape(z.shape[0], c, *z.shape[2:]) for i in range(d)]
        return torch.cat(parts, 1)

    def forward(self, z, t):
        s = self.score(z, t)
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).reshape(-1).expand(z.shape[0])
        return self.sde.score_to_eps(s, t).to(z.dtype)


def _inv_logdet(cov):
    """Inverse and log-determinant of batched 1x1 or 2x2 SPD matrices, in closed form."""
    if cov.shape[-1] == 1:
        return 1 / cov, torch.log(cov[..., 0, 0])
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    det = a * c - b * b
    inv = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
    return inv, torch.log(det)


def _apply_pixelwise(mat, z, d):
    """Apply per-sample d x d matrices mat [B, d, d] to the channel halves of z."""
    c = z.shape[1] // d
    parts = [z[:, i * c : (i + 1) * c] for i in range(d)]
    shape = (-1,) + (1,) * (z.ndim - 1)
    out = [sum(mat[:, i, j].reshape(shape) * parts[j] for j in range(d)) for i in range(d)]
    return torch.cat(out, 1)


def reference_solution(model, sde, zT, t_eps=1e-3, rtol=1e-10, atol=1e-10):
    """float64 solution at t_eps of the PF-ODE of `model` (a GaussianMixture) from zT at T.

    dz/dt = 1/2 beta(t) (Fbar z - D score(z, t)), integrated backwards with scipy's DOP853;
    independent of fastint's own tables and kernels. The marginals depend on t only through
    B(t) = int_0^t beta, so the ODE is solved in B (dz/dB = 1/2 (Fbar z - D score)): smooth
    even where beta is not (a discrete DDPM schedule has a kink at each of its knots).
    """
    try:
        from scipy.integrate import solve_ivp
    except ImportError as e:  # pragma: no cover
        raise ImportError("reference_solution needs scipy: pip install scipy") from e
    d = sde.dim
    z0 = zT.detach().to(torch.float64).cpu()
    shape = z0.shape
    fbar = sde.Fbar.to(torch.float64)
    dmat = sde.D.to(torch.float64)

    def rhs(b, y):
        z = torch.from_numpy(y).reshape(shape)
        t = sde.inv_int_beta(torch.tensor(b, dtype=torch.float64))
        s = model.score(z, t.reshape(1).repeat(shape[0]))
        drift = _apply_pixelwise(fbar.expand(shape[0], d, d), z, d) - _apply_pixelwise(dmat.expand(shape[0], d, d), s, d)
        return (0.5 * drift).reshape(-1).numpy()

    b_T, b_eps = (float(sde.int_beta(torch.tensor(x, dtype=torch.float64))) for x in (sde.T, t_eps))
    sol = solve_ivp(rhs, (b_T, b_eps), z0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference PF-ODE solve failed: {sol.message}")
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape)


def tweedie_reference(model, sde, z, t):
    """float64 Tweedie denoising Psi(0,t)(z + Sigma_t score) for the process's Sigma_t.

    Its x part is E[x0 | z_t], the same as the sampler's denoising row. The m part is
    different: here it is the momentum component of Psi^{-1} E[mean | z_t], which is 0 for
    an exact model, while the table row returns the posterior mean of m0
    (docs/integrators.md). Compare x parts only.
    """
    z = z.to(torch.float64)
    tt = torch.full((z.shape[0],), float(t), dtype=torch.float64)
    s = model.score(z, tt)
    cov = sde.marginal_cov(tt)
    psi_inv = torch.linalg.inv(sde.transition(tt, torch.zeros_like(tt)))
    d = sde.dim
    return _apply_pixelwise(psi_inv, z + _apply_pixelwise(cov, s, d), d)
