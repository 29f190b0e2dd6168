"""What a single-file checkpoint does not say, from a config given beside it (``--config``).

A single file holds tensors only: widths and levels can be read from their shapes, head counts, group
counts and the noise schedule cannot. This reads them from either
- a diffusers folder (``unet/ vae/ text_encoder/ scheduler/`` config files) or one of its config.json files, or
- a CompVis inference YAML (``v1-inference.yaml``, ``v2-inference-v.yaml``: ``model.params.unet_config`` ...),
- or the ``latentdiff`` entry of a safetensors file's metadata (what latentdiff's single-file writer adds),

and returns plain keyword dicts for the component configs: ``{"unet": {...}, "autoencoder": {...},
"text": {...}, "diffusion": {...}, "image_size": n}`` (only what the source says). Every key of a
CompVis YAML section latentdiff reads is honoured, accepted as training-only, or refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json, metadata_json_object
from latentdiff.formats.clip_keys import clip_text_config_from_hf
from latentdiff.formats.sd_configs import unet_config_from_diffusers, vae_config_from_diffusers

METADATA_KEY = "latentdiff"  # safetensors metadata entry of the configs, written by the single-file writer
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' names -> ours
Config = dict[str, Any]

# CompVis UNetModel params: ours, or (None, accepted values) to accept only SD's value, or None for no effect
_UNET_YAML: dict[str, Any] = {
    "in_channels": "in_channels", "out_channels": "out_channels", "model_channels": "model_channels",
    "attention_resolutions": "attention_resolutions", "num_res_blocks": "num_res_blocks",
    "channel_mult": "channel_mult", "num_heads": "num_heads", "num_head_channels": "num_head_channels",
    "transformer_depth": "transformer_depth", "context_dim": "context_dim", "dropout": "dropout",
    "use_linear_in_transformer": "use_linear_projection",
    "use_spatial_transformer": (None, (True,)), "conv_resample": (None, (True,)), "dims": (None, (2,)),
    "num_classes": (None, (None,)), "use_scale_shift_norm": (None, (False,)), "resblock_updown": (None, (False,)),
    "disable_self_attentions": (None, (None,)), "num_attention_blocks": (None, (None,)),
    "disable_middle_self_attn": (None, (False,)), "adm_in_channels": (None, (None,)), "n_embed": (None, (None,)),
    "num_heads_upsample": (None, (-1,)),
    # no effect on the outputs: memory and precision switches, an unused size, attention of other block kinds
    "image_size": None, "use_checkpoint": None, "use_fp16": None, "use_bf16": None, "legacy": None,
    "use_new_attention_order": None, "spatial_transformer_attn_type": None}
_DDCONFIG_YAML: dict[str, Any] = {
    "double_z": "double_z", "z_channels": "z_channels", "in_channels": "in_channels", "out_ch": "out_channels",
    "ch": "base_channels", "ch_mult": "channel_mult", "num_res_blocks": "num_res_blocks", "dropout": "dropout",
    "attn_resolutions": (None, ([],)), "attn_type": (None, ("vanilla", "vanilla-xformers")), "resolution": None,
    "tanh_out": (None, (False,)), "give_pre_end": (None, (False,)), "resamp_with_conv": (None, (True,))}
# LatentDiffusion params read here; the rest of that section configures training only (accepted)
_MODEL_YAML_READ = ("linear_start", "linear_end", "timesteps", "parameterization", "scale_factor", "image_size",
                    "conditioning_key", "beta_schedule", "given_betas", "rescale_betas_zero_snr", "unet_config",
                    "first_stage_config", "cond_stage_config")


def _section(params: Any, table: dict[str, Any], where: str) -> Config:
    """Our keyword arguments from a CompVis params mapping, every key honoured, accepted or refused by name."""
    if not isinstance(params, dict):
        raise UserError(f"{where}: expected a mapping")
    out = {}
    for key, value in params.items():
        if key not in table:
            raise UserError(f"{where}: unknown key {key!r}: latentdiff cannot tell whether it changes the model")
        rule = table[key]
        if isinstance(rule, str):
            out[rule] = tuple(value) if isinstance(value, list) else value
        elif isinstance(rule, tuple) and value not in rule[1]:
            raise UserError(f"{where}: {key}={value!r} is not supported (latentdiff reads "
                            f"{' or '.join(map(repr, rule[1]))})")
    if out.get("num_heads") == -1:
        del out["num_heads"]
    if out.get("num_head_channels", -1) != -1 and "num_heads" in out:
        del out["num_heads"]  # CompVis: a head width, when given, decides the heads
    return out


def config_from_yaml(data: Any, where: str) -> Config:
    """The configs a CompVis inference YAML describes (``model.params``)."""
    try:
        params = data["model"]["params"]
    except (KeyError, TypeError):
        raise UserError(f"{where}: not a CompVis model config (expected model: params:)") from None
    out: Config = {"diffusion": {"schedule": "scaled_linear"}}
    d = out["diffusion"]
    if params.get("given_betas") is not None or params.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: given_betas / rescale_betas_zero_snr are not supported")
    if params.get("beta_schedule", "linear") != "linear":  # CompVis' "linear" is linear in √β: scaled_linear
        raise UserError(f"{where}: beta_schedule={params['beta_schedule']!r} is not supported (linear)")
    if params.get("conditioning_key", "crossattn") not in ("crossattn", "hybrid"):
        raise UserError(f"{where}: conditioning_key={params['conditioning_key']!r} is not supported "
                        "(crossattn, or hybrid for inpainting)")
    for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"), ("num_timesteps", "timesteps")):
        if theirs in params:
            d[ours] = params[theirs]
    if "parameterization" in params:
        kind = {"eps": "eps", "v": "v", "x0": "x0"}.get(params["parameterization"])
        if kind is None:
            raise UserError(f"{where}: parameterization={params['parameterization']!r} unknown (eps, v, x0)")
        d["prediction"] = kind
    unet = params.get("unet_config", {}).get("params", {})
    out["unet"] = _section(unet, _UNET_YAML, f"{where}: model.params.unet_config.params")
    first = params.get("first_stage_config", {}).get("params", {})
    vae = _section(first.get("ddconfig", {}), _DDCONFIG_YAML, f"{where}: first_stage_config.params.ddconfig")
    if "embed_dim" in first:
        vae["embed_dim"] = first["embed_dim"]
    if "scale_factor" in params:
        vae["scale_factor"] = float(params["scale_factor"])
    out["autoencoder"] = vae
    cond = params.get("cond_stage_config", {})
    target = str(cond.get("target", ""))
    if target:
        layer = (cond.get("params") or {}).get("layer", "last")
        if not target.endswith(("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder")) or layer not in ("last",
                                                                                                   "penultimate"):
            raise UserError(f"{where}: cond_stage_config {target} (layer {layer!r}) is not supported: latentdiff "
                            "reads FrozenCLIPEmbedder and FrozenOpenCLIPEmbedder, layer last or penultimate")
        out["text_skip"] = 1 if layer == "penultimate" else 0
    if "image_size" in params:
        out["latent_size"] = int(params["image_size"])
    return out


def scheduler_config_from_diffusers(cfg: dict[str, Any], where: str) -> Config:
    """DiffusionConfig keyword arguments from a diffusers scheduler_config.json."""
    if cfg.get("trained_betas") is not None or cfg.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: trained_betas / rescale_betas_zero_snr are not supported")
    schedule = cfg.get("beta_schedule", "scaled_linear")
    if schedule not in ("linear", "scaled_linear"):
        raise UserError(f"{where}: beta_schedule {schedule!r} is not supported (linear, scaled_linear)")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise UserError(f"{where}: prediction_type {kind!r} unknown (expected {', '.join(PREDICTIONS)})")
    return {"schedule": schedule, "num_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "prediction": PREDICTIONS[kind], "beta_start": float(cfg.get("beta_start", 0.00085)),
            "beta_end": float(cfg.get("beta_end", 0.012))}


def _from_json(cfg: Any, where: str) -> Config:
    """One diffusers component config.json, told apart by its class name."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a JSON object")
    name = cfg.get("_class_name") or (cfg.get("architectures") or [""])[0]
    if name == "UNet2DConditionModel":
        return {"unet": unet_config_from_diffusers(cfg, where), "latent_size": cfg.get("sample_size")}
    if name == "AutoencoderKL":
        return {"autoencoder": vae_config_from_diffusers(cfg, where)}
    if name == "CLIPTextModel" or cfg.get("model_type") == "clip_text_model":
        return {"text": clip_text_config_from_hf(cfg, where)}
    if "beta_schedule" in cfg or "num_train_timesteps" in cfg:
        return {"diffusion": scheduler_config_from_diffusers(cfg, where)}
    raise UserError(f"{where}: not a UNet2DConditionModel, AutoencoderKL, CLIPTextModel or scheduler config")


def read_config(path: Path | str) -> Config:
    """The configs of ``path``: a diffusers folder, one of its config.json files, or a CompVis YAML."""
    path = Path(path)
    if path.is_dir():
        out: Config = {}
        for sub in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "scheduler/scheduler_config.json"):
            if (path / sub).is_file():
                out |= _from_json(load_json(path / sub), str(path / sub))
        if not out:
            raise UserError(f"{path}: no unet/, vae/, text_encoder/ or scheduler/ config files in this folder")
        return out
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    if path.suffix == ".json":
        return _from_json(load_json(path), str(path))
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{path}: give a diffusers folder, a config.json or a CompVis .yaml")
    try:
        return config_from_yaml(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def config_from_metadata(metadata: dict[str, str] | None, where: str) -> Config:
    """The configs latentdiff's writer stored in a safetensors file's metadata (empty when there are none)."""
    return metadata_json_object(metadata, METADATA_KEY, where)


# ---- the guess from the weights, corrected by a config ---------------------------------------------------
UNET_SHAPE_KEYS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                   "attention_resolutions", "transformer_depth", "context_dim", "use_linear_projection", "num_classes")
UNET_HEAD_KEYS = ("num_heads", "num_head_channels", "heads_per_level")  # what the weights cannot tell
VAE_SHAPE_KEYS = ("in_channels", "out_channels", "base_channels", "channel_mult", "num_res_blocks", "z_channels",
                  "embed_dim", "attn_in_mid")
TEXT_SHAPE_KEYS = ("vocab_size", "context_length", "width", "intermediate_size")


def _same(key: str, a: Any, b: Any) -> bool:
    norm = (lambda v: tuple(sorted(v))) if key == "attention_resolutions" else (
        lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def merge_guess(guess: Config, given: Config, shape_keys: tuple[str, ...], section: str, where: str,
                replaced: tuple[str, ...] = ()) -> Config:
    """``guess`` (read from the weights) with what the config ``given`` says; a disagreement on what the
    weights show (``shape_keys``) is a UserError naming the key. If ``given`` sets any of ``replaced``
    (the guessed head settings), the guess's values for all of them are dropped."""
    for key in shape_keys:
        if key in given and key in guess and not _same(key, given[key], guess[key]):
            raise UserError(f"{where}: the config says {section}.{key}={given[key]!r} but the weights have "
                            f"{guess[key]!r}: the config belongs to another model")
    if any(k in given for k in replaced):
        guess = {k: v for k, v in guess.items() if k not in replaced}
    return guess | given
