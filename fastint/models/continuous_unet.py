"""ContinuousUNet: the "Missing U" denoiser (Calvo-Ordonez et al., 2310.20092; docs/models.md).

A U-Net whose blocks are continuous dynamical systems. Each ODE block maps

    h  ->  h(1) = h + ∫₀¹ f(h(s), temb) ds,

solved inside the forward pass by `ode_steps` fixed steps of classical RK4 (4 evaluations
of f per step), with

    f(h, temb) = act(conv3x3(FiLM(norm(act(conv3x3(norm(h)))), temb)))

where FiLM(u, temb) = u * (1 + scale) + shift, and (scale, shift) = Linear(SiLU(temb)) is
computed once per block per forward. Every ODE block is conditioned on the time this way
(the public reference code of the paper forgot to pass the embedding to its blocks; here
tests check that each block's output moves with t). The last conv of f starts at zero, so
every block starts as the identity.

Between levels: a 1x1 conv to the next level's width (doubling it where ch_mult doubles)
then bilinear downsampling by 2; on the way up bilinear upsampling by 2, a 1x1 conv back,
and the skip from the same level merged by concatenation + 1x1 conv. Self-attention sits
only at the lowest resolution. One ODE block per level on each side, one in the middle.
A time-conditioned per-pixel linear skip from input to output (layers.TimeLinearSkip)
carries the part of ε that is linear in the state.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .layers import AttnBlock, TimeLinearSkip, TimeMLP, check_inputs, check_int, check_mult, group_norm


class ODEFunc(nn.Module):
    """The vector field f(h; scale, shift) of an ODE block."""

    def __init__(self, ch):
        super().__init__()
        self.norm1 = group_norm(ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = group_norm(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h, scale, shift):
        u = F.silu(self.conv1(self.norm1(h)))
        u = self.norm2(u) * (1.0 + scale) + shift
        return F.silu(self.conv2(u))


class ODEBlock(nn.Module):
    """h -> h + ∫₀¹ f(h(s), temb) ds by `steps` RK4 steps of size 1/steps."""

    def __init__(self, ch, temb_ch, steps=1):
        super().__init__()
        self.steps = steps
        self.func = ODEFunc(ch)
        self.temb_proj = nn.Linear(temb_ch, 2 * ch)

    def forward(self, h, temb):
        scale, shift = self.temb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        f = self.func
        dt = 1.0 / self.steps
        for _ in range(self.steps):
            k1 = f(h, scale, shift)
            k2 = f(h + (0.5 * dt) * k1, scale, shift)
            k3 = f(h + (0.5 * dt) * k2, scale, shift)
            k4 = f(h + dt * k3, scale, shift)
            h = h + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return h


class ContinuousUNet(nn.Module):
    """Missing-U denoiser: model(z, t) -> eps for a state z [B, in_channels, H, W] and times t [B].

    Args:
        in_channels: state channels (C for VP, 2C for PSLD/CLD).
        out_channels: output channels (default in_channels).
        ch: width at full resolution; level i has width ch * ch_mult[i].
        ch_mult: one entry per resolution level (H and W must be divisible by 2^(levels-1)).
        ode_steps: RK4 steps per ODE block (4 evaluations of f each).
        attention: self-attention at the lowest resolution.
        time_scale: the network sees time_scale * t (1000: DDPM's step index).
        resolution: recorded for checkpoints and FLOP counts; any valid size runs.
        linear_skip: add a time-conditioned per-pixel linear map of z to the output
            (layers.TimeLinearSkip; needed for a stable PSLD probability-flow ODE).
    """

    arch = "ContinuousUNet"

    def __init__(self, in_channels=1, out_channels=None, ch=32, ch_mult=(1, 2), ode_steps=1, attention=True,
                 time_scale=1000.0, resolution=8, linear_skip=True):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels)
        ch = check_int("ch", ch)
        ch_mult = check_mult("ch_mult", ch_mult)
        ode_steps = check_int("ode_steps", ode_steps)
        resolution = check_int("resolution", resolution)
        for name, flag in (("attention", attention), ("linear_skip", linear_skip)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(ch_mult) - 1)}, "
                             f"got {resolution}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
                           ode_steps=ode_steps, attention=attention, time_scale=float(time_scale),
                           resolution=resolution, linear_skip=linear_skip)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        temb_ch = 4 * ch
        self.temb = TimeMLP(ch, temb_ch, time_scale)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(ODEBlock(w, temb_ch, ode_steps) for w in widths)
        self.down_convs = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.mid_attn = AttnBlock(widths[-1]) if attention else nn.Identity()
        self.mid_block = ODEBlock(widths[-1], temb_ch, ode_steps)
        self.up_convs = nn.ModuleList(nn.Conv2d(b, a, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.merges = nn.ModuleList(nn.Conv2d(2 * w, w, 1) for w in widths)
        self.up_blocks = nn.ModuleList(ODEBlock(w, temb_ch, ode_steps) for w in widths)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        self.skip = TimeLinearSkip(in_channels, out_channels, temb_ch) if linear_skip else None

    @classmethod
    def cifar32(cls, in_channels=3, **overrides):
        """The 32x32 configuration compared with UNet.ddpm_cifar10(): ch=64, ch_mult=(1, 2, 4, 4)
        (about 1/4 of its parameters; docs/models.md has the measured ratios)."""
        cfg = dict(ch=64, ch_mult=(1, 2, 4, 4), ode_steps=1, attention=True, resolution=32)
        cfg.update(overrides)
        return cls(in_channels=in_channels, **cfg)

    def ode_blocks(self):
        """Every ODE block, in forward order (down, middle, up)."""
        return list(self.down_blocks) + [self.mid_block] + list(reversed(self.up_blocks))

    def forward(self, z, t):
        t = check_inputs(self, z, t)
        temb = self.temb(t)
        h = self.conv_in(z)
        skips = []
        for i in range(self.num_levels):
            h = self.down_blocks[i](h, temb)
            skips.append(h)
            if i < self.num_levels - 1:
                h = F.interpolate(self.down_convs[i](h), scale_factor=0.5, mode="bilinear", align_corners=False)
        h = self.mid_block(self.mid_attn(h), temb)
        for i in reversed(range(self.num_levels)):
            if i < self.num_levels - 1:
                h = self.up_convs[i](F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))
            h = self.merges[i](torch.cat([h, skips.pop()], dim=1))
            h = self.up_blocks[i](h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out if self.skip is None else out + self.skip(z, temb)
