"""CLIP: a text transformer shaped exactly like Stable Diffusion's CLIP text encoder, a small ViT, and
the contrastive loss that trains them together (Radford et al. 2021).

The text tower is OpenAI CLIP's: token + learned position embeddings, pre-LN blocks with a causal
mask, a final LayerNorm; ``formats/clip_keys.py`` maps a transformers ``CLIPTextModel`` state dict
onto it, so SD v1's text encoder (ViT-L/14 text tower) loads into :class:`CLIPTextTransformer`.
The diffusion model is conditioned on the per-token hidden states (:class:`CLIPTextEncoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import (load_into, load_json, load_json_object, load_tensors, naming_file, save_json,
                                          save_tensors)
from latentdiff.formats.dataclass_io import ConfigMixin
from latentdiff.models.tokenizer import Tokenizer, load_tokenizer

ACTIVATIONS = ("quick_gelu", "gelu")


def _check_heads(section: str, width: int, heads: int) -> None:
    if width <= 0 or heads <= 0 or width % heads:
        raise UserError(f"{section}: width {width} must be a positive multiple of heads {heads}")


@dataclass
class CLIPTextConfig(ConfigMixin):
    """Hyper-parameters of :class:`CLIPTextTransformer`; :meth:`sd_v1` is Stable Diffusion v1's encoder."""

    section: ClassVar[str] = "clip.text"

    vocab_size: int = 1000
    context_length: int = 77  # tokens per prompt, including start and end (SD: 77)
    width: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int | None = None  # MLP hidden width; None: 4 * width
    act: str = "quick_gelu"  # OpenAI CLIP uses x·σ(1.702x); "gelu" for exact GELU (newer CLIPs)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 128  # joint text-image embedding width of CLIPModel (both towers project to it)
    eos_id: int | None = None  # end-of-text token: pooled = hidden state at its first position;
    # None: at the largest id (OpenAI's tokenizer puts end-of-text last; transformers' eos_token_id == 2 case)

    def __post_init__(self) -> None:
        _check_heads(self.section, self.width, self.heads)
        if self.act not in ACTIVATIONS:
            raise UserError(f"{self.section}.act: unknown value {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        for key in ("vocab_size", "context_length", "layers", "projection_dim"):
            if getattr(self, key) <= 0:
                raise UserError(f"{self.section}.{key} must be > 0, got {getattr(self, key)}")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise UserError(f"{self.section}.eos_id {self.eos_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width."""
        return self.intermediate_size or 4 * self.width

    @classmethod
    def sd_v1(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text tower, the conditioning of Stable Diffusion v1.x."""
        return cls(vocab_size=49408, context_length=77, width=768, layers=12, heads=12, intermediate_size=3072,
                   act="quick_gelu", projection_dim=768, eos_id=None)


@dataclass
class CLIPVisionConfig(ConfigMixin):
    """Hyper-parameters of :class:`CLIPVisionTransformer` (a ViT for small images)."""

    section: ClassVar[str] = "clip.vision"

    image_size: int = 32
    channels: int = 1
    patch_size: int = 4  # 32 px / 4 = 8x8 = 64 patch tokens + the class token
    width: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int | None = None  # None: 4 * width
    act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_heads(self.section, self.width, self.heads)
        if self.act not in ACTIVATIONS:
            raise UserError(f"{self.section}.act: unknown value {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise UserError(f"{self.section}: image_size {self.image_size} is not divisible by "
                            f"patch_size {self.patch_size}")

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width."""
        return self.intermediate_size or 4 * self.width


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the activation OpenAI CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply element-wise."""
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q, k, v, out projections (CLIP's layout) through SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """x: (B, L, D) -> (B, L, D); ``causal``: token i attends to tokens ≤ i only."""
        b, n, _ = x.shape
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)); shared by the text and image towers."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()  # named fc1 / fc2 like CLIP's MLP
        self.mlp.add_module("fc1", nn.Linear(width, mlp_width))
        self.mlp.add_module("act", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_width, width))

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x), causal)
        return x + self.mlp(self.norm2(x))


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower: ids (B, L) -> (per-token hidden states (B, L, D), pooled at end-of-text (B, D))."""

    def __init__(self, config: CLIPTextConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CLIPTextConfig()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps)
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        # CLIP's init: small normal embeddings (std 0.02 tokens, 0.01 positions)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, L ≤ context_length) -> (hidden (B, L, D) after the final LayerNorm, pooled (B, D))."""
        if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
            raise UserError(f"text ids must be (batch, ≤{self.config.context_length}) tokens, got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, causal=True)  # a token sees only itself and what precedes it
        x = self.final_norm(x)
        return x, x[torch.arange(len(ids), device=ids.device), self.eos_positions(ids)]

    def eos_positions(self, ids: Tensor) -> Tensor:
        """Index of the first end-of-text token per row (the largest id when ``eos_id`` is None)."""
        if self.config.eos_id is None:
            return ids.argmax(dim=-1)
        is_eos = ids == self.config.eos_id
        if not bool(is_eos.any(dim=-1).all()):
            raise UserError(f"every prompt's ids must hold the end-of-text token {self.config.eos_id}")
        return is_eos.int().argmax(dim=-1)  # argmax gives the first maximum


class CLIPVisionTransformer(nn.Module):
    """A ViT: patches -> tokens with a class token and positions, pre-LN blocks, pooled = LN(class token)."""

    def __init__(self, config: CLIPVisionConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CLIPVisionConfig()
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width ** -0.5)
        self.position_embedding = nn.Parameter(torch.randn(n + 1, cfg.width) * cfg.width ** -0.5)
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps)
                                    for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> pooled features (B, width)."""
        cfg = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise UserError(f"CLIP image encoder expects (batch, {cfg.channels}, {cfg.image_size}, {cfg.image_size}) "
                            f"images, got {tuple(x.shape)}")
        t = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([self.class_embedding.expand(len(t), 1, -1), t], dim=1) + self.position_embedding
        t = self.pre_norm(t)
        for block in self.blocks:
            t = block(t)
        return self.post_norm(t[:, 0])


class CLIPModel(nn.Module):
    """Text and image towers with bias-free projections into one space and a learned temperature."""

    def __init__(self, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig) -> None:
        super().__init__()
        self.text_config, self.vision_config = text_config, vision_config
        d = text_config.projection_dim
        self.text = CLIPTextTransformer(text_config)
        self.vision = CLIPVisionTransformer(vision_config)
        self.text_projection = nn.Linear(text_config.width, d, bias=False)
        self.visual_projection = nn.Linear(vision_config.width, d, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # τ, with e^τ = 1/0.07 at the start

    def config_dict(self) -> dict[str, dict]:
        """Both configs, as the ``clip`` component's config.json."""
        return {"text": self.text_config.to_dict(), "vision": self.vision_config.to_dict()}

    def encode_text(self, ids: Tensor) -> Tensor:
        """Unit-length text embeddings norm(T_f W_t), (B, projection_dim)."""
        return F.normalize(self.text_projection(self.text(ids)[1]), dim=-1)

    def encode_image(self, x: Tensor) -> Tensor:
        """Unit-length image embeddings norm(I_f W_i) of images in [-1, 1], (B, projection_dim)."""
        return F.normalize(self.visual_projection(self.vision(x)), dim=-1)

    def features(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings, text embeddings, e^τ): what the logits are made of."""
        scale = self.logit_scale.exp().clamp(max=100.0)  # CLIP caps e^τ at 100 so training stays stable
        return self.encode_image(images), self.encode_text(ids), scale

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        """logits_per_image (B_img, B_txt) = (norm(I_f W_i) · norm(T_f W_t)ᵀ) · e^τ  (CLIP, DESIGN.md)."""
        image, text, scale = self.features(images, ids)
        return clip_logits(image, text, scale)


class CLIPFeatures(nn.Module):
    """A CLIPModel whose forward is :meth:`CLIPModel.features` (what data-parallel training wraps and gathers)."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings, text embeddings, e^τ)."""
        return self.clip.features(images, ids)


def clip_logits(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """(norm(I_f W_i) · norm(T_f W_t)ᵀ) · e^τ from the unit embeddings (B_img, D), (B_txt, D)."""
    return scale * image @ text.T


def clip_loss(logits: Tensor) -> Tensor:
    """Mean of the cross-entropies over rows and over columns, the diagonal as labels (CLIP, DESIGN.md)."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"clip_loss needs square (B, B) logits, got {tuple(logits.shape)}")
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIPTextEncoder(nn.Module):
    """Prompts -> per-token hidden states (B, L, width): the diffusion model's cross-attention context."""

    def __init__(self, tokenizer: Tokenizer, text_model: CLIPTextTransformer) -> None:
        super().__init__()
        cfg = text_model.config
        if tokenizer.context_length != cfg.context_length:
            raise UserError(f"tokenizer makes {tokenizer.context_length} tokens but the text encoder expects "
                            f"{cfg.context_length}")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the text encoder only {cfg.vocab_size}")
        self.tokenizer, self.text_model = tokenizer, text_model

    @property
    def width(self) -> int:
        """Width of each token's hidden state (the UNet's context_dim)."""
        return self.text_model.config.width

    @property
    def context_length(self) -> int:
        """Tokens per prompt."""
        return self.text_model.config.context_length

    def forward(self, prompts: list[str]) -> Tensor:
        """(B, context_length, width) last hidden states (after the final LayerNorm, as SD v1 uses them)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(list(prompts)).to(self.text_model.token_embedding.weight.device)
        return self.text_model(ids)[0]

    def save(self, folder: Path | str) -> None:
        """Write config.json (kind "clip"), model.safetensors and tokenizer/ into ``folder``."""
        folder = Path(folder)
        self.tokenizer.save(folder / "tokenizer")
        save_tensors(self.text_model.state_dict(), folder / "model.safetensors")
        save_json({"kind": "clip", **self.text_model.config.to_dict()}, folder / "config.json")


def _component_dir(folder: Path, name: str) -> Path:
    """``folder/name`` of a model folder, or ``folder`` itself when it is that component's folder."""
    sub = folder / name
    if sub.is_dir():
        return sub
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    raise UserError(f"{folder} has no {name}/ component (train one with `latentdiff train clip-fashion`)")


def _find_tokenizer(sub: Path) -> Tokenizer:
    """The tokenizer beside the weights (``sub/tokenizer``) or at the model folder's top (``../tokenizer``)."""
    for candidate in (sub / "tokenizer", sub.parent / "tokenizer"):
        if candidate.is_dir():
            return load_tokenizer(candidate)
    raise UserError(f"{sub}: no tokenizer/ folder beside it or in its model folder")


def load_clip_text_encoder(folder: Path | str, device: str | torch.device = "cpu") -> CLIPTextEncoder:
    """Rebuild a frozen CLIPTextEncoder from a model folder or its ``text_encoder/`` folder."""
    sub = _component_dir(Path(folder), "text_encoder")
    config = dict(load_json_object(sub / "config.json"))
    kind = config.pop("kind", "clip")
    if kind != "clip":
        raise UserError(f"{sub / 'config.json'}: not a CLIP text encoder (kind {kind!r})")
    with naming_file(sub / "config.json"):
        model = CLIPTextTransformer(CLIPTextConfig.from_dict(config))
    load_into(model, load_tensors(sub / "model.safetensors"), str(sub / "model.safetensors"))
    return CLIPTextEncoder(_find_tokenizer(sub), model).to(device).eval().requires_grad_(False)


def load_clip(folder: Path | str, device: str | torch.device = "cpu") -> tuple[CLIPModel, Tokenizer]:
    """The whole CLIP model (``clip/``) and its tokenizer from a model folder."""
    sub = _component_dir(Path(folder), "clip")
    config: Any = load_json(sub / "config.json")
    if not isinstance(config, dict) or set(config) != {"text", "vision"}:
        raise UserError(f"{sub / 'config.json'}: expected the sections 'text' and 'vision'")
    with naming_file(sub / "config.json"):
        model = CLIPModel(CLIPTextConfig.from_dict(config["text"]), CLIPVisionConfig.from_dict(config["vision"]))
    load_into(model, load_tensors(sub / "model.safetensors"), str(sub / "model.safetensors"))
    return model.to(device).eval(), _find_tokenizer(sub)
