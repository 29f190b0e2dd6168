"""diffusers' config.json files <-> latentdiff's configs, with every key either honoured or refused by name.

Each table below lists every key of a diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` config and
says what latentdiff does with it (tests/test_sd_configs.py walks the installed diffusers' keys, so a new
key cannot slip through; docs/stable_diffusion.md prints the tables):

- ``read``: becomes a latentdiff setting, with the same effect as in diffusers (parity-tested);
- ``only``: accepted at the listed value(s), the ones SD uses; any other value is refused, naming the key;
- ``inert``: accepted at any value because it cannot change what the model computes here (the reason says why).

Keys that start with ``_`` are diffusers' bookkeeping (``_class_name``, ``_diffusers_version``). Any key in
none of the tables is refused: a setting latentdiff does not know might change the model.
"""

from __future__ import annotations

from typing import Any

from latentdiff.errors import UserError

KeyTable = dict[str, tuple[str, tuple[Any, ...], str]]  # key -> (policy, accepted values for "only", what it means)

UNET_KEYS: KeyTable = {
    "sample_size": ("read", (), "latent side; times the VAE's factor it is the default image size"),
    "in_channels": ("read", (), "unet.in_channels (9 = SD inpainting)"),
    "out_channels": ("read", (), "unet.out_channels"),
    "center_input_sample": ("read", (), "unet.center_input: the network sees 2z - 1"),
    "flip_sin_to_cos": ("only", (True,), "timestep embedding as [cos, sin], as CompVis"),
    "freq_shift": ("only", (0,), "timestep embedding frequencies, as CompVis"),
    "down_block_types": ("read", (), "CrossAttnDownBlock2D / DownBlock2D per level: unet.attention_resolutions"),
    "mid_block_type": ("only", ("UNetMidBlock2DCrossAttn",), "ResBlock, transformer, ResBlock"),
    "up_block_types": ("read", (), "must mirror down_block_types"),
    "only_cross_attention": ("only", (False,), "attn1 is self-attention"),
    "block_out_channels": ("read", (), "unet.model_channels x unet.channel_mult"),
    "layers_per_block": ("read", (), "unet.num_res_blocks (one value, or the same for every level)"),
    "downsample_padding": ("read", (), "unet.downsample_padding (0: pad right and bottom only)"),
    "mid_block_scale_factor": ("read", (), "unet.mid_scale: the middle ResBlocks' output divisor"),
    "dropout": ("read", (), "unet.dropout (training only)"),
    "act_fn": ("only", ("silu",), "SiLU everywhere"),
    "norm_num_groups": ("read", (), "unet.norm_groups (must divide every width)"),
    "norm_eps": ("read", (), "unet.norm_eps of the ResBlock and output GroupNorms"),
    "cross_attention_dim": ("read", (), "unet.context_dim (one value, or the same for every level)"),
    "transformer_layers_per_block": ("read", (), "unet.transformer_depth (one value, or the same for every level)"),
    "reverse_transformer_layers_per_block": ("only", (None,), "the up path mirrors the down path"),
    "encoder_hid_dim": ("only", (None,), "the context goes to cross-attention as it is"),
    "encoder_hid_dim_type": ("only", (None,), "the context goes to cross-attention as it is"),
    "attention_head_dim": ("read", (), "head count (diffusers' name for it): one, or one per level "
                                       "(unet.num_heads, unet.num_head_channels or unet.heads_per_level)"),
    "num_attention_heads": ("only", (None,), "diffusers itself refuses it (heads come from attention_head_dim)"),
    "dual_cross_attention": ("only", (False,), "one transformer per attention block"),
    "use_linear_projection": ("read", (), "unet.use_linear_projection (SD v2: Linear proj_in / proj_out)"),
    "class_embed_type": ("only", (None,), "class labels only through num_class_embeds"),
    "addition_embed_type": ("only", (None,), "no added text/time embedding (SDXL's text_time is not supported)"),
    "addition_time_embed_dim": ("only", (None,), "no added time embedding"),
    "num_class_embeds": ("read", (), "unet.num_classes + 1 (the extra row is the null class)"),
    "upcast_attention": ("inert", (), "softmax precision in fp16; latentdiff runs the UNet in fp32 or bf16 SDPA"),
    "resnet_time_scale_shift": ("only", ("default",), "the timestep embedding is added, not scale-shift"),
    "resnet_skip_time_act": ("inert", (), "used only by block types latentdiff refuses (ResnetDownsampleBlock2D...)"),
    "resnet_out_scale_factor": ("inert", (), "used only by block types latentdiff refuses (ResnetDownsampleBlock2D...)"),
    "time_embedding_type": ("only", ("positional",), "sinusoidal timestep embedding"),
    "time_embedding_dim": ("only", (None,), "the time embedding is 4 x block_out_channels[0] wide"),
    "time_embedding_act_fn": ("only", (None,), "no activation after the time embedding"),
    "timestep_post_act": ("only", (None,), "no activation after the time embedding"),
    "time_cond_proj_dim": ("only", (None,), "no guidance embedding (LCM-distilled UNets); use an LCM-LoRA instead"),
    "conv_in_kernel": ("only", (3,), "3x3 input conv"),
    "conv_out_kernel": ("only", (3,), "3x3 output conv"),
    "projection_class_embeddings_input_dim": ("only", (None,), "no projected class embedding"),
    "attention_type": ("only", ("default",), "plain cross-attention (no gated GLIGEN layers)"),
    "class_embeddings_concat": ("only", (False,), "class embedding added to the time embedding"),
    "mid_block_only_cross_attention": ("only", (None, False), "the middle attn1 is self-attention"),
    "cross_attention_norm": ("only", (None,), "no norm on the context"),
    "addition_embed_type_num_heads": ("inert", (), "used only with addition_embed_type, which must be null"),
}

VAE_KEYS: KeyTable = {
    "in_channels": ("read", (), "autoencoder.in_channels"),
    "out_channels": ("read", (), "autoencoder.out_channels"),
    "down_block_types": ("only", ("DownEncoderBlock2D",), "per level"),
    "up_block_types": ("only", ("UpDecoderBlock2D",), "per level"),
    "block_out_channels": ("read", (), "autoencoder.base_channels x autoencoder.channel_mult"),
    "layers_per_block": ("read", (), "autoencoder.num_res_blocks"),
    "act_fn": ("only", ("silu",), "SiLU everywhere"),
    "latent_channels": ("read", (), "autoencoder.z_channels = embed_dim"),
    "norm_num_groups": ("read", (), "autoencoder.norm_groups (must divide every width)"),
    "sample_size": ("inert", (), "diffusers' default tile size; latentdiff tiles only with --vae-tile"),
    "scaling_factor": ("read", (), "autoencoder.scale_factor, the latent scale s"),
    "shift_factor": ("read", (), "autoencoder.shift_factor (null: 0)"),
    "latents_mean": ("only", (None,), "no per-channel latent normalisation"),
    "latents_std": ("only", (None,), "no per-channel latent normalisation"),
    "force_upcast": ("inert", (), "latentdiff keeps the VAE in fp32 always"),
    "use_quant_conv": ("only", (True,), "quant_conv is present"),
    "use_post_quant_conv": ("only", (True,), "post_quant_conv is present"),
    "mid_block_add_attention": ("read", (), "autoencoder.attn_in_mid"),
}
DOWN_TYPES, UP_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")


def check_config_keys(config: dict[str, Any], table: KeyTable, where: str) -> None:
    """Refuse, naming it, any key of ``config`` that ``table`` does not know or holds at another value."""
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in table:
            raise UserError(f"{where}: unknown key {key!r}: this version of latentdiff cannot tell whether it "
                            "changes the model, so it does not load it (docs/stable_diffusion.md lists the known keys)")
        policy, accepted, meaning = table[key]
        values = value if isinstance(value, (list, tuple)) and policy == "only" and value else [value]
        if policy == "only" and any(v not in accepted for v in values):
            raise UserError(f"{where}: {key}={value!r} is not supported (latentdiff reads "
                            f"{' or '.join(map(repr, accepted))}: {meaning})")


def markdown_table(table: KeyTable) -> str:
    """The table as Markdown rows (docs/stable_diffusion.md prints these, a test keeps them in step)."""
    rows = ["| key | latentdiff | what it means here |", "| --- | --- | --- |"]
    for key, (policy, accepted, meaning) in table.items():
        how = {"read": "honoured", "inert": "accepted, no effect"}.get(policy) or \
            "only " + ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a)
                                for a in accepted)
        rows.append(f"| `{key}` | {how} | {meaning} |")
    return "\n".join(rows)


def _one(config: dict[str, Any], key: str, default: Any, where: str) -> Any:
    """A key that may be one value or the same value per level."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"{where}: per-level {key} {value} is not supported (one value for every level)")
        value = value[0]
    return value


def _groups(groups: Any, channels: list[int], where: str) -> int:
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise UserError(f"{where}: norm_num_groups={groups!r} must be a positive integer dividing every width "
                        f"of block_out_channels {channels}")
    return groups


# ---- UNet ---------------------------------------------------------------------------------------------
def unet_config_from_diffusers(config: dict[str, Any], where: str = "unet/config.json") -> dict[str, Any]:
    """UNetConfig keyword arguments from a diffusers UNet2DConditionModel config (every key checked)."""
    check_config_keys(config, UNET_KEYS, where)
    try:
        channels = list(config["block_out_channels"])
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
    except KeyError as e:
        raise UserError(f"{where}: missing key {e.args[0]!r}") from None
    bad = [t for t in down if t not in DOWN_TYPES] + [t for t in up if t not in UP_TYPES]
    if bad or len(down) != len(channels) or len(up) != len(channels):
        raise UserError(f"{where}: block types {down} / {up} over {channels}: latentdiff reads one of "
                        f"{DOWN_TYPES} / {UP_TYPES} per level of block_out_channels")
    mc = channels[0]
    if any(c % mc for c in channels):
        raise UserError(f"{where}: block_out_channels {channels} must be multiples of the first")
    attn = [2**i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    if [2**(len(up) - 1 - i) for i, t in enumerate(up) if t.startswith("CrossAttn")][::-1] != attn:
        raise UserError(f"{where}: down_block_types {down} and up_block_types {up} must mirror each other")
    heads = config.get("attention_head_dim", 8)  # diffusers' naming quirk: a head count
    if isinstance(heads, int):
        head_kw: dict[str, Any] = {"num_heads": heads}
    elif len(heads) != len(channels):
        raise UserError(f"{where}: attention_head_dim {heads} needs one head count per level of {channels}")
    elif len({c // h for c, h in zip(channels, heads)}) == 1 and not any(c % h for c, h in zip(channels, heads)):
        head_kw = {"num_head_channels": channels[0] // heads[0]}  # one head width everywhere: SD v2's form
    else:
        head_kw = {"heads_per_level": tuple(heads)}
    num_classes = config.get("num_class_embeds")
    context = _one(config, "cross_attention_dim", 1280, where)
    if context is None:
        raise UserError(f"{where}: cross_attention_dim is null; a UNet2DConditionModel needs a context width")
    return {"in_channels": config.get("in_channels", 4), "out_channels": config.get("out_channels", 4),
            "model_channels": mc, "channel_mult": tuple(c // mc for c in channels),
            "num_res_blocks": _one(config, "layers_per_block", 2, where), "attention_resolutions": tuple(attn),
            "transformer_depth": _one(config, "transformer_layers_per_block", 1, where), "context_dim": context,
            "use_linear_projection": bool(config.get("use_linear_projection", False)),
            "num_classes": None if num_classes is None else num_classes - 1, "dropout": float(config.get("dropout", 0)),
            "norm_groups": _groups(config.get("norm_num_groups", 32), channels, where),
            "norm_eps": float(config.get("norm_eps", 1e-5)), "downsample_padding": config.get("downsample_padding", 1),
            "center_input": bool(config.get("center_input_sample", False)),
            "mid_scale": float(config.get("mid_block_scale_factor", 1.0)), **head_kw}


def unet_config_to_diffusers(cfg: Any, layout: Any) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config.json for our UNetConfig ``cfg`` and its `UNetLayout`."""
    channels = [level.channels for level in layout.levels]
    attn = [level.attention for level in layout.levels]
    if cfg.context_dim is None:
        raise UserError("diffusers' UNet2DConditionModel needs cross-attention (unet.context_dim is None)")
    widths = [level.head_dim for level in layout.levels if level.heads]
    if cfg.heads_per_level:
        heads: Any = list(cfg.heads_per_level)
    elif cfg.num_head_channels > 0:
        heads = [c // cfg.num_head_channels for c in channels]
    else:
        heads = cfg.num_heads
    if any(level.heads * level.head_dim != level.channels for level in layout.levels if level.heads):
        raise UserError(f"diffusers' UNet needs heads x head width = channels at every attention level "
                        f"(channels {channels}, head widths {widths})")
    _groups(cfg.norm_groups, channels, "diffusers' UNet2DConditionModel")
    return {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "layers_per_block": cfg.num_res_blocks, "transformer_layers_per_block": cfg.transformer_depth,
            "attention_head_dim": heads, "cross_attention_dim": cfg.context_dim,
            "use_linear_projection": cfg.use_linear_projection, "norm_num_groups": cfg.norm_groups,
            "norm_eps": cfg.norm_eps, "downsample_padding": cfg.downsample_padding,
            "center_input_sample": cfg.center_input, "mid_block_scale_factor": cfg.mid_scale, "dropout": cfg.dropout,
            "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1}


# ---- VAE ----------------------------------------------------------------------------------------------
def vae_config_from_diffusers(config: dict[str, Any], where: str = "vae/config.json") -> dict[str, Any]:
    """AutoencoderConfig keyword arguments from a diffusers AutoencoderKL config (every key checked)."""
    check_config_keys(config, VAE_KEYS, where)
    channels = list(config.get("block_out_channels", [64]))
    base = channels[0]
    if any(c % base for c in channels):
        raise UserError(f"{where}: block_out_channels {channels} must be multiples of the first")
    latent = config.get("latent_channels", 4)
    return {"in_channels": config.get("in_channels", 3), "out_channels": config.get("out_channels", 3),
            "base_channels": base, "channel_mult": tuple(c // base for c in channels),
            "num_res_blocks": config.get("layers_per_block", 1), "z_channels": latent, "embed_dim": latent,
            "norm_groups": _groups(config.get("norm_num_groups", 32), channels, where),
            "attn_in_mid": bool(config.get("mid_block_add_attention", True)),
            "scale_factor": config.get("scaling_factor", 0.18215), "shift_factor": config.get("shift_factor") or 0.0}


def vae_config_to_diffusers(cfg: Any) -> dict[str, Any]:
    """A diffusers AutoencoderKL config.json for our AutoencoderConfig."""
    if cfg.z_channels != cfg.embed_dim or not cfg.double_z:
        raise UserError("diffusers' AutoencoderKL needs z_channels == embed_dim and double_z")
    levels = len(cfg.channel_mult)
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": channels, "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "layers_per_block": cfg.num_res_blocks,
            "latent_channels": cfg.embed_dim, "norm_num_groups": _groups(cfg.norm_groups, channels, "AutoencoderKL"),
            "mid_block_add_attention": cfg.attn_in_mid, "scaling_factor": cfg.scale_factor,
            "shift_factor": cfg.shift_factor or None}
