"""The denoising UNet ε̂(z_t, t, context) of latent diffusion, laid out exactly like CompVis `UNetModel`.

Structure and parameter names (`time_embed`, `label_emb`, `input_blocks`, `middle_block`, `output_blocks`, `out`)
match `ldm/modules/diffusionmodules/openaimodel.py`, so a Stable Diffusion v1/v2 checkpoint's
`model.diffusion_model.*` tensors load by name once the prefix is stripped. The UNet only takes a timestep;
what the prediction means (ε, x0 or v, DESIGN.md) is decided by `diffusion/`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin
from ..nn.attention import Attention, AttentionBlock, SpatialTransformer
from ..nn.embeddings import timestep_embedding
from ..nn.resblock import Downsample, ResBlock, Upsample, group_norm, zero_module
from .unet_layout import BlockLayout, LevelLayout, unet_layout


@dataclass
class UNetConfig(ConfigMixin):
    """Hyper-parameters of `UNet`; the defaults are a tiny model for 28x28 grey images on a CPU."""

    section: ClassVar[str] = "unet"

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 32  # width of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (each after the first halves H, W)
    num_res_blocks: int = 1  # ResBlocks per level on the way down (the way up has one more)
    attention_resolutions: tuple[int, ...] = (2,)  # downsampling factors (1, 2, 4, ...) that get a SpatialTransformer
    num_heads: int = 4
    num_head_channels: int = -1  # if > 0: heads = channels // num_head_channels, overriding num_heads (SD v2: 64)
    transformer_depth: int = 1
    # "transformer": SD's SpatialTransformer (self-attention, cross-attention, GEGLU feed-forward); "plain": one
    # self-attention per block, as CompVis's unconditional UNets and diffusers' UNet2DModel (no text context)
    attention_block: str = "transformer"
    context_dim: int | None = None  # width of the cross-attention context (text tokens); None: attn2 is self-attention
    use_linear_projection: bool = False  # SD v2: Linear instead of 1x1 conv for proj_in / proj_out
    dropout: float = 0.0
    num_classes: int | None = None  # class-conditional: label_emb has num_classes + 1 rows, the last is "no class"
    conv_resample: bool = True  # learned conv for down/up-sampling (else average pooling / plain nearest)
    # Options of diffusers' UNet2DConditionModel (docs/stable_diffusion.md lists every key); the defaults are SD's.
    heads_per_level: tuple[int, ...] = ()  # one head count per level (diffusers' per-block attention_head_dim);
    #                                        the middle block takes the last; () uses num_heads / num_head_channels
    # GroupNorm groups (norm_num_groups); a width they do not divide gets its largest divisor below
    norm_groups: int = 32
    norm_eps: float = 1e-5  # ε of the ResBlocks' and the output's GroupNorms (norm_eps)
    downsample_padding: int = 1  # 0: pad only right and bottom before each stride-2 conv (downsample_padding)
    center_input: bool = False  # the network sees 2 z - 1 (center_input_sample)
    mid_scale: float = 1.0  # the middle ResBlocks divide their output by this (mid_block_scale_factor)

    def __post_init__(self) -> None:
        self.channel_mult, self.attention_resolutions = tuple(self.channel_mult), tuple(self.attention_resolutions)
        positive = ["in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth"]
        positive += ["num_heads"] if self.num_head_channels <= 0 else []
        positive += [k for k in ("context_dim", "num_classes") if getattr(self, k) is not None]
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"unet.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise UserError(f"unet.channel_mult: expected a non-empty list of positive integers, "
                            f"got {list(self.channel_mult)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"unet.dropout: expected a value in [0, 1), got {self.dropout!r}")
        self.heads_per_level = tuple(self.heads_per_level)
        if self.heads_per_level and len(self.heads_per_level) != len(self.channel_mult):
            raise UserError(f"unet.heads_per_level: expected one head count per level ({len(self.channel_mult)}), "
                            f"got {list(self.heads_per_level)!r}")
        if self.norm_groups < 1 or not self.norm_eps > 0 or not self.mid_scale > 0:
            raise UserError(f"unet: norm_groups ({self.norm_groups}), norm_eps ({self.norm_eps}) and mid_scale "
                            f"({self.mid_scale}) must be positive")
        if self.attention_block not in ("transformer", "plain"):
            raise UserError(f"unet.attention_block: expected 'transformer' or 'plain', got {self.attention_block!r}")
        if self.attention_block == "plain" and (self.context_dim is not None or self.transformer_depth != 1):
            raise UserError("unet.attention_block=plain has no cross-attention and one attention per block: it "
                            f"needs context_dim None and transformer_depth 1 (got {self.context_dim}, "
                            f"{self.transformer_depth}); use attention_block=transformer")
        if self.downsample_padding not in (0, 1):
            raise UserError(f"unet.downsample_padding: expected 0 or 1, got {self.downsample_padding!r}")
        unet_layout(self)  # heads that do not fit a level's width are refused here, naming the level

    @classmethod
    def sd_v1(cls) -> UNetConfig:
        """Stable Diffusion v1.x UNet (859,520,964 parameters): 64x64x4 latents, CLIP ViT-L/14 context."""
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_heads=8, context_dim=768)

    @classmethod
    def sd_v2(cls) -> UNetConfig:
        """Stable Diffusion v2.x UNet: 64-wide heads, OpenCLIP ViT-H/14 context, linear projections."""
        return cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_head_channels=64, context_dim=1024,
                   use_linear_projection=True)




class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Run the layers in order, each with the inputs it takes (Sequential's forward takes one input)."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """UNet ε̂(x, t, context, class): ResBlocks + SpatialTransformers, skip connections between the two halves."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None

        def res(ch_in: int, ch_out: int, scale: float = 1.0) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.norm_groups, cfg.norm_eps, scale)

        def attn(level: LevelLayout) -> SpatialTransformer | AttentionBlock:
            if cfg.attention_block == "plain":
                return AttentionBlock(level.channels, level.heads, level.head_dim, cfg.norm_groups, cfg.norm_eps)
            return SpatialTransformer(level.channels, level.heads, level.head_dim, cfg.transformer_depth, cfg.dropout,
                                      cfg.context_dim, cfg.use_linear_projection, cfg.norm_groups)

        def block(b: BlockLayout) -> TimestepEmbedSequential:
            if b.downsample:
                return TimestepEmbedSequential(Downsample(b.ch_in, cfg.conv_resample, padding=cfg.downsample_padding))
            layers: list[nn.Module] = [res(b.ch_in, b.ch_out)]
            if b.attention:
                layers.append(attn(layout.levels[b.level]))
            if b.upsample:
                layers.append(Upsample(b.ch_out, cfg.conv_resample))
            return TimestepEmbedSequential(*layers)

        # Down: conv_in, then per level num_res_blocks x (ResBlock [+ attention]), then a Downsample.
        self.layout = layout = unet_layout(cfg)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.input_blocks.extend(block(b) for b in layout.down)
        # Middle: always attention at the lowest resolution, where the tokens are fewest.
        ch = layout.middle_channels
        self.middle_block = TimestepEmbedSequential(res(ch, ch, cfg.mid_scale), attn(layout.levels[-1]),
                                                    res(ch, ch, cfg.mid_scale))
        # Up: per level num_res_blocks + 1 ResBlocks, each eating one skip connection (concatenated on channels).
        self.output_blocks = nn.ModuleList(block(b) for b in layout.up)
        ch = layout.up[-1].ch_out
        # Zero-initialised output: the untrained model predicts 0 (the mean of ε), a well-conditioned start.
        self.out = nn.Sequential(group_norm(ch, cfg.norm_eps, cfg.norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    def set_attention_slice(self, heads: int | None) -> None:
        """Compute every attention ``heads`` (batch x head) score matrices at a time; None: all at once."""
        if heads is not None and heads < 1:
            raise UserError(f"attention slice must be a positive number of heads, got {heads}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.slice_size = heads

    def _check(self, x: Tensor, t: Tensor, context: Tensor | None, class_labels: Tensor | None) -> None:
        cfg, factor = self.config, 2 ** (len(self.config.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise UserError(f"UNet input must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise UserError(f"UNet input height and width must be divisible by {factor} "
                            f"(2 ** (len(channel_mult) - 1)), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise UserError(f"timesteps must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
        if cfg.context_dim is None and context is not None:
            raise UserError("this UNet has no cross-attention (context_dim is None) but a context was given")
        if cfg.context_dim is not None and (context is None or context.ndim != 3
                                            or context.shape[-1] != cfg.context_dim):
            got = None if context is None else tuple(context.shape)
            raise UserError(f"this UNet needs a context of shape (B, L, {cfg.context_dim}), got {got}")
        if cfg.num_classes is None and class_labels is not None:
            raise UserError("this UNet is not class-conditional (num_classes is None) but class_labels were given")

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: Tensor, t: Tensor | float | int, context: Tensor | None = None,
                class_labels: Tensor | None = None) -> Tensor:
        """Predict from x (B, C, H, W) at timesteps t ((B,) or scalar), optional context (B, L, D) and labels (B,)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self._check(x, t, context, class_labels)
        dtype = next(self.time_embed.parameters()).dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            if class_labels is None:  # no label given: the "null" class (last row), as classifier-free guidance uses
                null = self.label_emb.num_embeddings - 1  # = num_classes
                class_labels = torch.full((x.shape[0],), null, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(class_labels)
        skips, h = [], 2 * x - 1 if self.config.center_input else x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
