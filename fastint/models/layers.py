"""Building blocks shared by the image denoisers (UNet, ContinuousUNet).

Both networks follow fastint's call convention `model(z, t) -> eps`: z is the state
[B, dim*C, H, W] and t a float tensor [B] (or a scalar) of forward time in (0, T].
"""
import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(channels, groups=32):
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding [B, dim] of times t [B] (Transformer / DDPM style, of scale*t).

    DDPM feeds the integer step k in 0..999; fastint's time is t = k/1000 in (0, 1], hence
    the default scale. Computed in float32 whatever t's dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1))
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeMLP(nn.Module):
    """t [B] -> sinusoid(ch) -> Linear -> SiLU -> Linear: the shared time embedding [B, temb_ch]."""

    def __init__(self, ch, temb_ch, scale=1000.0):
        super().__init__()
        self.ch, self.scale = ch, scale
        self.fc1 = nn.Linear(ch, temb_ch)
        self.fc2 = nn.Linear(temb_ch, temb_ch)

    def forward(self, t):
        emb = timestep_embedding(t, self.ch, self.scale).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with a residual (DDPM's AttnBlock)."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(hn).reshape(b, c, h * w).transpose(1, 2)
        v = self.v(hn).reshape(b, c, h * w).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


def check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_mult(name, value):
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{name} must be a non-empty tuple of ints, got {value!r}")
    return tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def check_inputs(model, z, t):
    """Validate model(z, t) inputs; returns t as a float tensor [B] on z's device."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a tensor, got {type(z).__name__}")
    if z.ndim != 4 or z.shape[1] != model.in_channels:
        raise ValueError(f"z must have shape [B, {model.in_channels}, H, W], got {tuple(z.shape)}")
    div = 2 ** (model.num_levels - 1)
    if z.shape[2] % div or z.shape[3] % div:
        raise ValueError(f"z's height and width must be divisible by {div} ({model.num_levels} levels), "
                         f"got {tuple(z.shape[2:])}")
    if not isinstance(t, torch.Tensor):
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            t = torch.tensor(float(t), device=z.device)
        else:
            raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    if t.ndim != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(f"t must be a scalar or have shape [{z.shape[0]}], got {tuple(t.shape)}")
    return t.to(device=z.device, dtype=torch.float32)


class TimeLinearSkip(nn.Module):
    """A per-pixel linear map of the input, its matrix a function of time: W(temb) z.

    The ideal ε of a linear diffusion is, at large t, nearly linear in the state
    (ε ≈ L_t⁻¹ z). A GroupNorm'd network loses the input's scale at its output norm, so it
    can only approximate that map; for PSLD/CLD the probability-flow ODE is sensitive to it
    (the momentum damping −ν cancels against the score term), and a few percent of error
    made the learned ODE diverge. This skip carries the linear part exactly. Zero at init.
    """

    def __init__(self, in_ch, out_ch, temb_ch):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.proj = nn.Linear(temb_ch, in_ch * out_ch)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z, temb):
        w = self.proj(F.silu(temb)).reshape(-1, self.out_ch, self.in_ch)
        return torch.einsum("boi,bihw->bohw", w, z)
