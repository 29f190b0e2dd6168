"""A small transformer over the text encoder's token states, trained with the UNet (unet.text_layers > 0).

A frozen sentence encoder's token states say what each word is, but cross-attention keys are a linear
map of them, so "which of the two objects is above" (the first noun phrase for "above", the second
for "below": an XOR of phrase and relation) is hard to read off one token. A few self-attention
layers over the tokens, with learned positions, can mix the relation into each object's words before
the UNet's cross-attention reads them. It is part of the UNet (its weights, EMA and checkpoint), so
training and sampling need nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentdiff.nn.attention import BasicTransformerBlock


class ContextAdapter(nn.Module):
    """(B, L, context_dim) token states -> (B, L, width): a projection, learned positions, pre-norm blocks."""

    def __init__(self, context_dim: int, width: int, layers: int, heads: int, max_tokens: int = 77):
        super().__init__()
        self.proj_in = nn.Linear(context_dim, width)
        self.positions = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(BasicTransformerBlock(width, heads, width // heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, context: Tensor) -> Tensor:
        """Self-attention over the tokens (each block's cross-attention attends to the tokens too)."""
        x = self.proj_in(context) + self.positions[: context.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
