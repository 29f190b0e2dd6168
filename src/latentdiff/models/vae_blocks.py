"""The encoder and decoder of the KL autoencoder (models/autoencoder.py), block for block CompVis'.

Structure and parameter names (`encoder.down.{i}.block.{j}`, `mid.attn_1`, `decoder.up.{i}`, ...) match
CompVis `ldm/modules/diffusionmodules/model.py`; every GroupNorm has ε = 1e-6 and at most
``cfg.norm_groups`` groups (32 in SD; diffusers' norm_num_groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.resblock import group_norm

if TYPE_CHECKING:
    from .autoencoder import AutoencoderConfig


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))): CompVis' ResnetBlock without a timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, 1e-6, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, 1e-6, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 projection of the skip path only where the width changes (CompVis `nin_shortcut`).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to x (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels with 1x1-conv q, k, v and proj_out (CompVis `AttnBlock`)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, 1e-6, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> x + attention(x)."""
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head; SDPA takes its fused kernels only for 4-D inputs.
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v, as CompVis
        h = h[:, 0].transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H, W: pad right/bottom by one, then a 3x3 stride-2 conv (CompVis' asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H, W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, cfg: AutoencoderConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_groups)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups) if cfg.attn_in_mid else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_groups)
    return mid


class Encoder(nn.Module):
    """x (B, in, H, W) -> (B, 2*z or z, H/f, W/f): conv_in, levels of ResnetBlocks + Downsample, mid, norm, conv_out."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m, cfg.dropout, cfg.norm_groups))
                block_in = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _mid(block_in, cfg)
        self.norm_out = group_norm(block_in, 1e-6, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode x to the moments (or the code, when not double_z) at 1/f resolution."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out, f*h, f*w): mirror of the Encoder with one more ResnetBlock per level."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        # CompVis builds the levels from the lowest resolution up but stores them by resolution index:
        # up[0] is the full-resolution level (run last), up[-1] the one right after the middle block.
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], cfg.dropout, cfg.norm_groups))
                block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, 1e-6, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode z to an image at f times the resolution."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
