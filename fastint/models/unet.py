"""The DDPM U-Net of Ho et al. (2020): the baseline the ContinuousUNet is measured against.

Same layout as the reference implementation (diffusion_tf / pytorch_diffusion): a shared
time MLP, `num_res_blocks` ResBlocks per level on the way down and `num_res_blocks + 1` on
the way up (each fed the matching skip), GroupNorm(32) + SiLU, self-attention at the
resolutions in `attn_resolutions`, a strided 3x3 conv to downsample and nearest + 3x3 conv
to upsample. `UNet.ddpm_cifar10()` is the 32x32 CIFAR-10 model: 35,746,307 parameters.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .layers import AttnBlock, TimeLinearSkip, TimeMLP, check_inputs, check_int, check_mult, group_norm


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> + Linear(temb) -> norm -> SiLU -> dropout -> conv3x3, plus skip."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class UNet(nn.Module):
    """DDPM U-Net: model(z, t) -> eps for a state z [B, in_channels, H, W] and times t [B].

    Args:
        in_channels: state channels (C for VP, 2C for PSLD/CLD).
        out_channels: output channels (default in_channels).
        resolution: the training resolution; attention is placed where the feature map has
            a side in `attn_resolutions` (other input sizes divisible by 2^(levels-1) also run).
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout: as in Ho et al.
        time_scale: the network sees time_scale * t (1000: DDPM's step index).
        linear_skip: add fastint's time-conditioned linear skip (layers.TimeLinearSkip);
            off in the original DDPM architecture.
    """

    arch = "UNet"

    def __init__(self, in_channels=3, out_channels=None, resolution=32, ch=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, time_scale=1000.0,
                 linear_skip=False):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels)
        resolution = check_int("resolution", resolution)
        ch = check_int("ch", ch)
        ch_mult = check_mult("ch_mult", ch_mult)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks)
        attn_resolutions = tuple(check_int("attn_resolutions", r) for r in attn_resolutions)
        if not isinstance(linear_skip, bool):
            raise TypeError(f"linear_skip must be a bool, got {type(linear_skip).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(ch_mult) - 1)}, "
                             f"got {resolution}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, resolution=resolution, ch=ch,
                           ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=float(dropout),
                           time_scale=float(time_scale), linear_skip=linear_skip)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = len(ch_mult)
        temb_ch = 4 * ch
        self.temb = TimeMLP(ch, temb_ch, time_scale)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(cur, ch * mult, temb_ch, dropout))
                cur = ch * mult
                level.attns.append(AttnBlock(cur) if res in attn_resolutions else nn.Identity())
                skips.append(cur)
            if i != len(ch_mult) - 1:
                level.downsample = nn.Conv2d(cur, cur, 3, stride=2, padding=0)
                res //= 2
                skips.append(cur)
            self.down.append(level)

        self.mid1 = ResBlock(cur, cur, temb_ch, dropout)
        self.mid_attn = AttnBlock(cur)
        self.mid2 = ResBlock(cur, cur, temb_ch, dropout)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(cur + skips.pop(), ch * mult, temb_ch, dropout))
                cur = ch * mult
                level.attns.append(AttnBlock(cur) if res in attn_resolutions else nn.Identity())
            if i != 0:
                level.upsample = nn.Conv2d(cur, cur, 3, padding=1)
                res *= 2
            self.up.insert(0, level)

        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self.skip = TimeLinearSkip(in_channels, out_channels, temb_ch) if linear_skip else None

    @classmethod
    def ddpm_cifar10(cls, in_channels=3, **overrides):
        """Ho et al.'s 32x32 CIFAR-10 configuration (35.7M parameters at in_channels=3)."""
        cfg = dict(resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                   dropout=0.1)
        cfg.update(overrides)
        return cls(in_channels=in_channels, **cfg)

    def forward(self, z, t):
        t = check_inputs(self, z, t)
        temb = self.temb(t)
        hs = [self.conv_in(z)]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if i != self.num_levels - 1:
                hs.append(level.downsample(F.pad(hs[-1], (0, 1, 0, 1))))  # TF "SAME" for stride 2
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if i != 0:
                h = level.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out if self.skip is None else out + self.skip(z, temb)
