"""Building blocks: timestep embedding, residual blocks, attention (SDPA) and spatial transformers."""

from .attention import GEGLU, Attention, AttentionBlock, BasicTransformerBlock, FeedForward, SpatialTransformer
from .embeddings import timestep_embedding
from .resblock import Downsample, ResBlock, Upsample, norm_groups, zero_module

__all__ = ["Attention", "AttentionBlock", "BasicTransformerBlock", "Downsample", "FeedForward", "GEGLU", "ResBlock",
           "SpatialTransformer", "Upsample", "norm_groups", "timestep_embedding", "zero_module"]
