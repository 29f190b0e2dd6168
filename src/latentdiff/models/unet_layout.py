"""The UNet's level walk, once: which blocks each resolution level has, and their channels.

`UNet.__init__` builds its layers from this layout and the Stable Diffusion key maps
(`formats/sd_keys.py`) name the same blocks from it, so the two cannot drift apart. The layout is plain
values (ints and bools): `formats/` reads it without importing `models/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from latentdiff.errors import UserError

if TYPE_CHECKING:
    from latentdiff.models.unet import UNetConfig


@dataclass(frozen=True)
class LevelLayout:
    """One resolution level: level i works at 1 / 2**i of the input's height and width."""

    channels: int  # width of the level's ResBlocks: model_channels * channel_mult[i]
    attention: bool  # its ResBlocks are followed by a SpatialTransformer (2**i in attention_resolutions)
    heads: int = 0  # attention heads of its SpatialTransformers (0: the level has none) ...
    head_dim: int = 0  # ... each this wide (channels // heads, or SD v2's fixed 64)


@dataclass(frozen=True)
class BlockLayout:
    """One entry of `input_blocks[1:]` or `output_blocks`: a ResBlock [+ attention] [+ Upsample], or a Downsample."""

    level: int  # the resolution level it belongs to
    index: int  # its place among the level's ResBlocks on this side (diffusers' resnets.{index})
    ch_in: int  # channels in; on the way up the running width plus the skip connection it eats
    ch_out: int
    downsample: bool = False  # a lone Downsample (input side, after each level but the last)
    attention: bool = False  # a SpatialTransformer after the ResBlock
    upsample: bool = False  # an Upsample ends the block (output side, last block of each level but level 0)


@dataclass(frozen=True)
class UNetLayout:
    """The whole walk: levels, then the blocks in CompVis order (`input_blocks[0]` is conv_in, not listed)."""

    levels: tuple[LevelLayout, ...]
    down: tuple[BlockLayout, ...]  # input_blocks[1:]
    middle_channels: int  # middle_block: ResBlock, SpatialTransformer, ResBlock at the lowest resolution
    up: tuple[BlockLayout, ...]  # output_blocks


def level_heads(cfg: UNetConfig, level: int, channels: int) -> tuple[int, int]:
    """(heads, head width) of attention at ``level`` (``channels`` wide): per level, fixed width or fixed count.

    Stable Diffusion v1 fixes the count (8), v2 the width (64); diffusers configs may give one count per
    level (``heads_per_level``), and then the middle block uses the last level's. Too narrow a level for
    its heads is a UserError naming the level.
    """
    if cfg.heads_per_level:
        heads, how = cfg.heads_per_level[level], f"unet.heads_per_level[{level}]={cfg.heads_per_level[level]}"
        width = channels // heads if heads > 0 else 0
    elif cfg.num_head_channels > 0:
        heads, how = channels // cfg.num_head_channels, f"{cfg.num_head_channels}-wide heads (unet.num_head_channels)"
        width = cfg.num_head_channels
    else:
        heads, how = cfg.num_heads, f"unet.num_heads={cfg.num_heads}"
        width = channels // heads
    if heads < 1 or width < 1:
        raise UserError(f"unet: attention at level {level} ({channels} channels) gets no head of width >= 1 "
                        f"with {how}")
    return heads, width


def unet_layout(cfg: UNetConfig) -> UNetLayout:
    """The levels and blocks of a UNet of config ``cfg`` (CompVis `UNetModel` layout)."""
    mc, nrb = cfg.model_channels, cfg.num_res_blocks
    levels: list[LevelLayout] = []
    for i, mult in enumerate(cfg.channel_mult):
        attention, last = 2**i in cfg.attention_resolutions, i == len(cfg.channel_mult) - 1
        heads = level_heads(cfg, i, mc * mult) if attention or last else (0, 0)  # the middle block reads the last's
        levels.append(LevelLayout(mc * mult, attention, *heads))
    down: list[BlockLayout] = []
    skips, ch = [mc], mc  # channels of every skip connection (conv_in's first), the running width
    for i, level in enumerate(levels):
        for j in range(nrb):
            down.append(BlockLayout(i, j, ch, level.channels, attention=level.attention))
            ch = level.channels
            skips.append(ch)
        if i != len(levels) - 1:
            down.append(BlockLayout(i, 0, ch, ch, downsample=True))
            skips.append(ch)
    middle = ch
    up: list[BlockLayout] = []
    for i in reversed(range(len(levels))):  # each ResBlock eats one skip connection, so one more than down
        for j in range(nrb + 1):
            up.append(BlockLayout(i, j, ch + skips.pop(), levels[i].channels, attention=levels[i].attention,
                                  upsample=i > 0 and j == nrb))
            ch = levels[i].channels
    return UNetLayout(tuple(levels), tuple(down), middle, tuple(up))
