"""Residual block with timestep embedding, and the 2x down/up-sampling layers of the UNet.

Parameter names follow CompVis `ldm/modules/diffusionmodules/openaimodel.py`, so the keys of a Stable
Diffusion checkpoint (`model.diffusion_model.*`, prefix stripped) load into these modules unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: 32 (as in SD) when it divides `channels`, else the largest divisor below it."""
    # Small or odd widths (tiny CPU models) cannot use 32 groups; the largest divisor keeps groups as close
    # to SD's as possible (e.g. 16 channels -> 16 groups, 48 -> 24) and never changes SD's own layers.
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def group_norm(channels: int, eps: float = 1e-5, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with `norm_groups(channels, max_groups)` groups."""
    return nn.GroupNorm(norm_groups(channels, max_groups), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` and return it (so a residual branch starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = (x + f(x, emb)) / output_scale: GroupNorm-SiLU-conv, add projected timestep embedding,
    GroupNorm-SiLU-dropout-conv. ``groups`` (most GroupNorm groups), ``eps`` and ``output_scale`` are
    diffusers' norm_num_groups, norm_eps and output_scale_factor; the defaults are SD's."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-5, output_scale: float = 1.0):
        super().__init__()
        out_channels = out_channels or channels
        self.output_scale = output_scale
        self.in_layers = nn.Sequential(group_norm(channels, eps, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Zero-initialised last conv: each block starts as the identity, which keeps a deep UNet stable at init.
        self.out_layers = nn.Sequential(
            group_norm(out_channels, eps, groups), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to x (B, C, H, W) conditioned on emb (B, emb_channels)."""
        h = self.in_layers(x)
        h += self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # timestep (and class) shift per channel
        out = self.out_layers(h)  # in-place adds on fresh conv outputs: no extra (B, C, H, W) buffer, same sums
        out += self.skip_connection(x)
        return out if self.output_scale == 1.0 else out.div_(self.output_scale)


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (or 2x2 average pooling when use_conv=False).

    ``padding`` 1 pads every side (SD); 0 pads only right and bottom by one (diffusers' downsample_padding=0).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.pad_right_bottom = use_conv and padding == 0
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        else:
            assert out_channels == channels, "average pooling cannot change the channel count"
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample x by 2 in each spatial dimension."""
        return self.op(F.pad(x, (0, 1, 0, 1)) if self.pad_right_bottom else x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (optional) to smooth the blocky result."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        assert use_conv or out_channels == channels, "without a conv the channel count cannot change"
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """Upsample x by 2 in each spatial dimension."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x
