"""Attention blocks of the SD UNet, all computed with `F.scaled_dot_product_attention` (fused kernels).

Names follow CompVis `ldm/modules/attention.py` (`to_q`, `to_k`, `to_v`, `to_out.0`, `attn1`, `attn2`, `ff`,
`norm1..3`, `proj_in`, `proj_out`, `transformer_blocks`) so Stable Diffusion weights load by key.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resblock import group_norm, zero_module


class Attention(nn.Module):
    """Multi-head attention: self-attention on x, or cross-attention from x to `context` when given."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, slice_size: int | None = None, qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.slice_size = heads, slice_size
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)  # SD: no bias; plain attention blocks: bias
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, N, query_dim), context: (B, M, context_dim) or None -> (B, N, query_dim)."""
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, L, heads*d) -> (B, heads, L, d): SDPA picks its fused (flash) kernels only for 4-D inputs.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype, s = q.dtype, self.slice_size
        # bf16 training on a CPU: torch's bf16 attention backward was 2-4x slower than fp32's at the 16-256 tokens
        # of CPU models (a probe; the whole step's gain is in benchmarks/results/cpu_step_options.md), so the
        # scores run in fp32 (exact, too)
        upcast = dtype == torch.bfloat16 and q.is_cpu and torch.is_grad_enabled()
        with torch.autocast("cpu", enabled=False) if upcast else nullcontext():
            if upcast:
                q, k, v = q.float(), k.float(), v.float()
            if s is None or s >= b * self.heads:
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # chunk over batch*heads so that only `s` (N x M) score matrices exist at once
                q, k, v = (t.flatten(0, 1)[None] for t in (q, k, v))  # (1, B*heads, L, d)
                out = torch.cat([F.scaled_dot_product_attention(q[:, i:i + s], k[:, i:i + s], v[:, i:i + s])
                                 for i in range(0, q.shape[1], s)], dim=1).unflatten(1, (b, self.heads))[0]
        return self.to_out(out.to(dtype).transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU unit: a, g = split(proj(x)); a * gelu(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated projection."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return a * F.gelu(gate)
        return F.gelu(gate).mul_(a)  # sampling: reuse the GELU buffer (autograd would need it unchanged)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU to mult*dim, dropout, Linear back to dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP token-wise."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention (self-attention when context is None), feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, N, dim); context: (B, M, context_dim) or None."""
        if torch.is_grad_enabled():
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff(self.norm3(x))
        x = x + self.attn1(self.norm1(x))  # a fresh tensor, so the next residuals may add in place (sampling)
        x += self.attn2(self.norm2(x), context)
        x += self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W pixels of a feature map, added back as a residual (zero-initialised output)."""

    def __init__(self, channels: int, num_heads: int | None = None, head_dim: int | None = None, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | None = None, use_linear: bool = False, groups: int = 32):
        super().__init__()
        if num_heads is None and head_dim is None:
            raise ValueError("give num_heads or head_dim (or both)")
        num_heads = num_heads or channels // head_dim  # SD v2 fixes the head width (64), SD v1 the count (8)
        head_dim = head_dim or channels // num_heads
        inner = num_heads * head_dim
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6, max_groups=groups)  # ε 1e-6 in CompVis and diffusers alike
        # SD v1 projects with 1x1 convs, SD v2 with Linear layers (same maths, different weight shapes).
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_heads, head_dim, dropout, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); context: (B, M, context_dim) or None -> (B, C, H, W)."""
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C) tokens; free for channels_last input
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class AttentionBlock(nn.Module):
    """Plain self-attention over the H*W pixels, added back as a residual: GroupNorm, one multi-head attention.

    The attention of CompVis's unconditional UNets (``use_spatial_transformer: False``) and of diffusers'
    UNet2DModel: no LayerNorms, no second attention and no feed-forward, so about half the work of a
    SpatialTransformer without context. It cannot take a text context.
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm = group_norm(channels, eps, groups)
        self.attn = Attention(channels, None, num_heads, head_dim, qkv_bias=True)
        zero_module(self.attn.to_out[0])  # starts as the identity, like the SpatialTransformer's proj_out

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); a context is refused (there is no cross-attention)."""
        if context is not None:
            raise ValueError("a plain AttentionBlock has no cross-attention: use a SpatialTransformer")
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        return x + self.attn(y).reshape(b, h, w, c).permute(0, 3, 1, 2)
