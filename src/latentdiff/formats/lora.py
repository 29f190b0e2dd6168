"""LoRA files for Stable Diffusion: the layouts people share, read into one list of low-rank updates.

A LoRA stores, per adapted layer, ``down`` (A, rank x in) and ``up`` (B, out x rank) with
W' = W + scale · (alpha / rank) · B A (Hu et al. 2021); convolutions hold (rank, in, kh, kw) and
(out, rank, 1, 1). Read here:

- kohya / A1111: ``lora_unet_<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` and ``lora_te_<name>...``
  for the text encoder, where ``<name>`` is the module's diffusers / transformers name (or its CompVis name)
  with dots turned into underscores;
- diffusers / PEFT: ``unet.<name>.lora_A.weight``, ``.lora_B.weight`` (``text_encoder.<name>`` for the text
  encoder), alphas in the ``lora_adapter_metadata`` JSON of the file's metadata (``lora_alpha``, ``r``,
  ``alpha_pattern``, ``rank_pattern``, ``use_rslora``) or as ``<name>.alpha`` tensors, else alpha = rank;
- diffusers' older names: ``<name>.lora.down.weight``, ``<name>.lora_linear_layer.up.weight`` and the
  attention processors' ``attn1.processor.to_q_lora.down.weight``.

formats/ does not know the networks: :func:`read_lora` returns each layer under the name the file uses,
and the caller resolves names with a table of the spellings its modules answer to (models/lora.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import metadata_json_object

Tensors = dict[str, torch.Tensor]
COMPONENTS = {"lora_unet": "unet", "lora_te": "text", "lora_te1": "text", "unet": "unet", "text_encoder": "text"}
_KOHYA = re.compile(r"(lora_unet|lora_te1?|lora_te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT = re.compile(r"(?:(unet|text_encoder)\.)?(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight")
_OLD = re.compile(r"(?:(unet|text_encoder)\.)?(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight")
_OLD_PROCESSOR = re.compile(r"(?:(unet|text_encoder)\.)?(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)"
                            r"\.weight")
_DIFFUSERS_ALPHA = re.compile(r"(?:(unet|text_encoder)\.)?(.+?)\.alpha")
_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", "lora_mid", "oft_", "diff_b", ".diff")


@dataclass
class LoraLayer:
    """One adapted layer: W' = W + scale · B A with ``scale`` = alpha / rank (the user's strength comes on top)."""

    component: str  # "unet" or "text"
    name: str  # the module as the file names it: dotted, or kohya's underscored form (``flat``)
    flat: bool
    down: torch.Tensor  # A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # B: (out, rank) or (out, rank, 1, 1)
    scale: float

    @property
    def rank(self) -> int:
        """The rank r of B A."""
        return self.down.shape[0]


def _component(prefix: str | None, name: str) -> str:
    """unet or text: from the key's prefix, or, unprefixed, from the name (transformers' CLIP layer names)."""
    if prefix:
        return COMPONENTS[prefix]
    return "text" if name.startswith(("text_model.", "encoder.layers.")) else "unet"


def _pattern_value(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's per-module override: a pattern matches a module name that ends with it (after a dot)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name):
            return value
    return default


def _peft_config(metadata: dict[str, str] | None, where: str) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata``: LoraConfig settings per component (``unet.lora_alpha`` ...)."""
    flat = metadata_json_object(metadata, "lora_adapter_metadata", where)  # a list or a number: refused by name
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        prefix, _, setting = key.partition(".")
        if prefix in COMPONENTS:
            out.setdefault(COMPONENTS[prefix], {})[setting] = value
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise UserError(f"{where}: DoRA adapters ({component}.use_dora) are not supported")
    return out


def read_lora(state: Tensors, metadata: dict[str, str] | None = None, where: str = "LoRA file") -> list[LoraLayer]:
    """Every adapted layer of a LoRA state dict (any layout above); unknown keys are a UserError naming them."""
    odd = [k for k in state if any(u in k for u in _UNSUPPORTED)]
    if odd:
        raise UserError(f"{where}: {odd[0]!r} belongs to a LoRA variant latentdiff does not read (LoHa, LoKr, "
                        "DoRA, LoCon mid weights, full diffs); plain LoRA only")
    parts: dict[tuple[str, str, bool], dict[str, Any]] = {}
    alphas: dict[tuple[str, str], float] = {}
    unknown = []
    for key, value in state.items():
        if m := _KOHYA.fullmatch(key):
            prefix, name, what = m.groups()
            if prefix == "lora_te2":
                raise UserError(f"{where}: {key!r} adapts SDXL's second text encoder, which SD v1/v2 does not have")
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[what]
            parts.setdefault((COMPONENTS[prefix], name, True), {})[slot] = value
        elif m := _PEFT.fullmatch(key) or _OLD.fullmatch(key):
            prefix, name, what = m.groups()
            slot = {"lora_A": "down", "lora_B": "up"}.get(what, what)
            parts.setdefault((_component(prefix, name), name, False), {})[slot] = value
        elif m := _OLD_PROCESSOR.fullmatch(key):
            prefix, base, proj, what = m.groups()
            component = _component(prefix, base)
            parts.setdefault((component, f"{base}.{_PROCESSOR_NAMES[component][proj]}", False), {})[what] = value
        elif m := _DIFFUSERS_ALPHA.fullmatch(key):
            prefix, name = m.groups()
            alphas[(_component(prefix, name), name)] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{where}: {len(unknown)} key(s) in no LoRA layout latentdiff knows, e.g. "
                        f"{', '.join(sorted(unknown)[:3])}")
    if not parts:
        raise UserError(f"{where}: no LoRA weights found (expected lora_down/lora_up or lora_A/lora_B keys)")
    config = _peft_config(metadata, where)
    layers = []
    for (component, name, flat), p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise UserError(f"{where}: layer {name!r} has no {'up' if 'down' in p else 'down'} weight")
        down, up = p["down"].float(), p["up"].float()
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise UserError(f"{where}: layer {name!r}: down is rank {rank} but up {tuple(up.shape)}")
        peft = config.get(component, {})
        alpha = float(p["alpha"]) if "alpha" in p else alphas.get((component, name))
        if alpha is None and peft:  # PEFT: lora_alpha / r, per-module patterns, optionally α/√r (rsLoRA)
            alpha = float(_pattern_value(name, peft.get("alpha_pattern") or {}, peft.get("lora_alpha", rank)))
            rank_cfg = float(_pattern_value(name, peft.get("rank_pattern") or {}, peft.get("r", rank)))
            scale = alpha / (math.sqrt(rank_cfg) if peft.get("use_rslora") else rank_cfg)
        else:
            scale = (alpha if alpha is not None else rank) / rank
        layers.append(LoraLayer(component, name, flat, down, up, scale))
    return layers


def flat_name(name: str) -> str:
    """kohya's spelling of a module name: dots become underscores."""
    return name.replace(".", "_")


def save_kohya(layers: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]) -> Tensors:
    """kohya / A1111 tensors for ``{(component, dotted diffusers/transformers name): (down, up, alpha)}``."""
    out: Tensors = {}
    for (component, name), (down, up, alpha) in layers.items():
        key = ("lora_unet_" if component == "unet" else "lora_te_") + flat_name(name)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out
