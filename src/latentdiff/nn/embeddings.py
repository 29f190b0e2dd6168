"""Sinusoidal timestep embedding (the Transformer positional encoding applied to the diffusion step t)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """Embed timesteps t of shape (B,) as (B, dim) features [cos(t·f_i), sin(t·f_i)], f_i = max_period^(-i/half)."""
    # Ordering cos-then-sin is CompVis `openaimodel.timestep_embedding` (= diffusers flip_sin_to_cos=True,
    # freq_shift=0): Stable Diffusion's time_embed weights were trained against exactly this layout.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd dim: pad one zero column so the width is exactly `dim`
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
