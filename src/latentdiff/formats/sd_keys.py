"""Stable Diffusion key names: CompVis (single-file, our own layout) <-> diffusers, and OpenCLIP -> ours.

Our UNet and autoencoder use CompVis names, so a single-file checkpoint loads after stripping its
prefixes; the diffusers folder layout renames blocks. Each map here is built from the model's state-dict
keys and its block layout, which the caller passes in (formats/ sits below models/ and does not import
it), so one table serves both directions and every key is accounted for (missing and unexpected keys are
UserErrors that name them). The configs themselves are read back from the tensor shapes where the
weights say it (widths, levels, attention, context width) and from convention where they do not
(head counts: SD v1 has 8 heads, SD v2 64-wide heads); diffusers' config.json files are read in
formats/sd_configs.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from latentdiff.errors import UserError

Tensors = dict[str, torch.Tensor]

_RES_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RES_VAE = {"nin_shortcut": "conv_shortcut"}
_ATTN_VAE = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# unet.attention_block=plain (nn.AttentionBlock) -> the attention of diffusers' UNet2DModel
_ATTN_PLAIN = {"norm": "group_norm", "attn.to_q": "to_q", "attn.to_k": "to_k", "attn.to_v": "to_v",
               "attn.to_out": "to_out"}


def _unet_blocks(layout: Any, plain: bool = False) -> dict[str, tuple[str, dict[str, str]]]:
    """CompVis block prefix -> (diffusers prefix, renames of the names inside the block).

    ``layout`` is the UNet's `UNetLayout` (models/unet_layout.py): the blocks of each level in CompVis order.
    ``plain``: its attention blocks are plain AttentionBlocks (UNet2DModel names), not SpatialTransformers.
    """
    attn = _ATTN_PLAIN if plain else {}
    blocks: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
        "label_emb": ("class_embedding", {}), "input_blocks.0.0": ("conv_in", {}),
        "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {}),
        "middle_block.0": ("mid_block.resnets.0", _RES_UNET), "middle_block.1": ("mid_block.attentions.0", attn),
        "middle_block.2": ("mid_block.resnets.1", _RES_UNET)}
    last = len(layout.levels) - 1  # diffusers numbers up_blocks in running order, CompVis by level
    for ours, first, side, level_of in (("input_blocks", 1, layout.down, lambda level: f"down_blocks.{level}"),
                                        ("output_blocks", 0, layout.up, lambda level: f"up_blocks.{last - level}")):
        for k, b in enumerate(side, start=first):
            theirs = level_of(b.level)
            if b.downsample:
                layers = [("downsamplers.0", {"op": "conv"})]
            else:
                layers = [(f"resnets.{b.index}", _RES_UNET)] + [(f"attentions.{b.index}", attn)] * b.attention
                layers += [("upsamplers.0", {})] * b.upsample
            for j, (name, inner) in enumerate(layers):
                blocks[f"{ours}.{k}.{j}"] = (f"{theirs}.{name}", inner)
    return blocks


def _vae_blocks(cfg: Any) -> dict[str, tuple[str, dict[str, str]]]:
    levels = len(cfg.channel_mult)
    blocks: dict[str, tuple[str, dict[str, str]]] = {"quant_conv": ("quant_conv", {}),
                                                      "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        blocks |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                   f"{part}.norm_out": (f"{part}.conv_norm_out", {}),
                   f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", _RES_VAE),
                   f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", _RES_VAE),
                   f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", _ATTN_VAE)}
    for i in range(levels):
        up = levels - 1 - i  # CompVis numbers decoder levels by resolution, diffusers in running order
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _RES_VAE)
            blocks[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", _RES_VAE)
        blocks[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", {})
        blocks[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    return blocks


def _rename(key: str, blocks: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """The diffusers name of a CompVis key, or None if no block owns it."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest block prefix first
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            target, inner = blocks[prefix]
            rest = ".".join(parts[n:])
            for old, new in inner.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{target}.{rest}"
    return None


def _key_map(keys: Iterable[str], blocks: dict[str, tuple[str, dict[str, str]]]) -> dict[str, str]:
    """CompVis key -> diffusers key for each of ``keys``, by the block tables."""
    out = {k: _rename(k, blocks) for k in keys}
    unnamed = [k for k, v in out.items() if v is None]
    if unnamed:  # a programming error: the block tables miss a layer of the model
        raise RuntimeError(f"no diffusers name for {unnamed[:3]}")
    return out  # type: ignore[return-value]


def unet_key_map(keys: Iterable[str], layout: Any) -> dict[str, str]:
    """CompVis key -> diffusers key for every key of our UNet: ``keys`` its state dict, ``layout`` its `UNetLayout`.

    SpatialTransformer UNets get UNet2DConditionModel's names, plain-attention ones UNet2DModel's."""
    keys = list(keys)
    return _key_map(keys, _unet_blocks(layout, plain=any(".attn.to_q." in k for k in keys)))


def vae_key_map(keys: Iterable[str], cfg: Any) -> dict[str, str]:
    """CompVis key -> diffusers key for every key of our autoencoder: ``keys`` its state dict, ``cfg`` its config."""
    return _key_map(keys, _vae_blocks(cfg))


def _convert(state: Tensors, mapping: dict[str, str], what: str) -> Tensors:
    """Rename by ``mapping`` (source -> target), naming missing and unexpected keys."""
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise UserError(f"{what}: {len(missing)} missing key(s) (e.g. {', '.join(missing[:3]) or '-'}), "
                        f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})")
    return {mapping[k]: v for k, v in state.items()}


def _inverse(mapping: dict[str, str]) -> dict[str, str]:
    return {d: c for c, d in mapping.items()}


def unet_to_diffusers(state: Tensors, key_map: dict[str, str]) -> Tensors:
    """Our (CompVis) UNet state dict -> diffusers UNet2DConditionModel names (``key_map``: `unet_key_map`)."""
    return _convert(state, key_map, "UNet state dict")


def unet_from_diffusers(state: Tensors, key_map: dict[str, str]) -> Tensors:
    """A diffusers UNet2DConditionModel state dict -> our (CompVis) names (``key_map``: `unet_key_map`)."""
    return _convert(state, _inverse(key_map), "diffusers UNet state dict")


def _vae_attn_shapes(state: Tensors, to_conv: bool) -> Tensors:
    """The VAE's mid-block attention is 1x1 convs in CompVis, Linear layers in diffusers: same numbers."""
    out = {}
    for k, v in state.items():
        if re.search(r"mid(\.attn_1|_block\.attentions\.0)\.(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0)\.weight$", k):
            v = v.reshape(*v.shape[:2], 1, 1) if to_conv else v.reshape(v.shape[:2])
        out[k] = v
    return out


def vae_to_diffusers(state: Tensors, key_map: dict[str, str]) -> Tensors:
    """Our (CompVis) autoencoder state dict -> diffusers AutoencoderKL names and shapes (``key_map``: `vae_key_map`)."""
    return _vae_attn_shapes(_convert(state, key_map, "autoencoder state dict"), to_conv=False)


def vae_from_diffusers(state: Tensors, key_map: dict[str, str]) -> Tensors:
    """A diffusers AutoencoderKL state dict -> our (CompVis) names and shapes (``key_map``: `vae_key_map`)."""
    return _vae_attn_shapes(_convert(state, _inverse(key_map), "diffusers VAE state dict"), to_conv=True)


# ---- OpenCLIP text tower (SD v2's cond_stage_model.model.*) -> CLIPTextTransformer ---------------
_OPEN_CLIP_LAYER = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.out", "mlp.c_fc": "mlp.fc1",
                    "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_SKIP = ("text_projection", "logit_scale", "attn_mask")  # pooled projection, loss scale, a buffer


def open_clip_text_layers(state: Tensors) -> int:
    """Number of transformer blocks in an OpenCLIP text state dict."""
    idx = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def clip_text_from_open_clip(state: Tensors, layers: int) -> Tensors:
    """OpenCLIP text weights -> CLIPTextTransformer keys, keeping the first ``layers`` blocks.

    SD v2 conditions on the penultimate block's output passed through the final LayerNorm, so its
    encoder is the first 23 of 24 blocks plus ``ln_final`` (what diffusers' converted folders hold too).
    ``in_proj_weight`` packs q, k, v; it is split here.
    """
    out: Tensors = {}
    unexpected = []
    for key, v in state.items():
        if key.startswith("visual.") or key in _OPEN_CLIP_SKIP:
            continue
        if key == "token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "positional_embedding":
            out["position_embedding.weight"] = v
        elif key.startswith("ln_final."):
            out["final_norm." + key.split(".")[-1]] = v
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key):  # in_proj_weight
            n, name, p = int(m.group(1)), m.group(2), m.group(3)
            if n >= layers:
                continue
            if name == "attn.in_proj":
                for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                    out[f"blocks.{n}.attn.{part}.{p}"] = chunk
            elif name in _OPEN_CLIP_LAYER:
                out[f"blocks.{n}.{_OPEN_CLIP_LAYER[name]}.{p}"] = v
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise UserError(f"OpenCLIP text state dict: {len(unexpected)} unexpected key(s), e.g. "
                        f"{', '.join(sorted(unexpected)[:3])}")
    return out


def clip_text_to_open_clip(state: Tensors, total_layers: int) -> tuple[Tensors, set[str]]:
    """CLIPTextTransformer keys -> OpenCLIP text keys, the inverse of `clip_text_from_open_clip`.

    SD v2 files hold ``total_layers`` blocks but read one fewer; blocks our tower does not have are
    written as identity blocks (every weight zero: the residual adds nothing). Returns the tensors and
    the names of those made-up ones, so a caller can put the file's own back in their place.
    """
    theirs = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out: Tensors = {}
    for key, v in state.items():
        if key == "position_embedding.weight":
            out["positional_embedding"] = v
        elif key.startswith("final_norm."):
            out["ln_final." + key.split(".")[-1]] = v
        elif key == "token_embedding.weight":
            out[key] = v
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            n, name, p = m.groups()
            if name in ("attn.q", "attn.k", "attn.v"):
                continue  # packed below
            out[f"transformer.resblocks.{n}.{theirs[name]}.{p}"] = v
        else:
            raise UserError(f"CLIP text state dict: no OpenCLIP name for {key!r}")
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for n in range(layers):
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{p}"] = torch.cat([state[f"blocks.{n}.attn.{x}.{p}"]
                                                                            for x in "qkv"])
    made_up = set()
    for n in range(layers, total_layers):
        for key, v in list(out.items()):
            if key.startswith("transformer.resblocks.0."):
                name = key.replace(".0.", f".{n}.", 1)
                out[name] = torch.zeros_like(v)
                made_up.add(name)
    return out, made_up


# ---- configs read from the weights -------------------------------------------------------------------
def _need(state: Tensors, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{what}: key {key!r} not found; this does not look like a Stable Diffusion "
                        f"{what} (keys start with: {', '.join(sorted(state)[:3])})")
    return state[key]


def unet_config_from_compvis(state: Tensors, v2: bool = False) -> dict[str, Any]:
    """UNetConfig keyword arguments from a CompVis UNet state dict (prefix already stripped).

    Head counts leave no trace in the weights: SD v1 uses 8 heads, SD v2 (``v2``) 64-wide heads.
    """
    conv_in = _need(state, "input_blocks.0.0.weight", "UNet")
    mc = conv_in.shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    downs = [b for b in blocks if f"input_blocks.{b}.0.op.weight" in state]
    levels = len(downs) + 1
    nrb = (len(blocks) - 1 - len(downs)) // levels
    if len(blocks) != 1 + levels * nrb + len(downs) or nrb < 1:
        raise UserError(f"UNet: {len(blocks)} input blocks with {len(downs)} downsamplers fit no UNet layout")
    mult, attn = [], []
    for level in range(levels):
        k = 1 + level * (nrb + 1)  # the level's first ResBlock: after conv_in and each level's nrb + Downsample
        out_ch = _need(state, f"input_blocks.{k}.0.in_layers.2.weight", "UNet").shape[0]
        if out_ch % mc:
            raise UserError(f"UNet: level {level} width {out_ch} is not a multiple of {mc}")
        mult.append(out_ch // mc)
        if f"input_blocks.{k}.1.proj_in.weight" in state:
            attn.append(2**level)
    mid = "middle_block.1."
    proj = _need(state, mid + "proj_in.weight", "UNet")
    linear = proj.ndim == 2
    depth = len({k.split(".")[3] for k in state if k.startswith(mid + "transformer_blocks.")})
    to_k = _need(state, mid + "transformer_blocks.0.attn2.to_k.weight", "UNet")
    context = to_k.shape[1]
    heads = {"num_head_channels": 64} if v2 else {"num_heads": 8}
    label = state.get("label_emb.weight")
    return {"in_channels": conv_in.shape[1], "out_channels": _need(state, "out.2.weight", "UNet").shape[0],
            "model_channels": mc, "channel_mult": tuple(mult), "num_res_blocks": nrb,
            "attention_resolutions": tuple(attn), "transformer_depth": depth, "context_dim": context,
            "use_linear_projection": linear, "num_classes": None if label is None else label.shape[0] - 1,
            **heads}


def vae_config_from_compvis(state: Tensors) -> dict[str, Any]:
    """AutoencoderConfig keyword arguments from a CompVis autoencoder state dict (prefix stripped)."""
    conv_in = _need(state, "encoder.conv_in.weight", "autoencoder")
    base = conv_in.shape[0]
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
    nrb = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    mult = tuple(_need(state, f"encoder.down.{i}.block.0.conv2.weight", "autoencoder").shape[0] // base
                 for i in range(levels))
    quant = _need(state, "quant_conv.weight", "autoencoder")
    return {"in_channels": conv_in.shape[1], "out_channels": _need(state, "decoder.conv_out.weight",
                                                                     "autoencoder").shape[0],
            "base_channels": base, "channel_mult": mult, "num_res_blocks": nrb,
            "z_channels": _need(state, "decoder.conv_in.weight", "autoencoder").shape[1],
            "embed_dim": quant.shape[0] // 2, "attn_in_mid": "encoder.mid.attn_1.q.weight" in state,
            "scale_factor": 0.18215}
