"""Stable Diffusion checkpoints as latentdiff pipelines: single files, diffusers folders, and back.

Reads (a) the original single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``; ``.safetensors``, or ``.ckpt`` through ``torch.load(weights_only=True)`` only)
and (b) the diffusers folder layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``). The variant
(v1: CLIP ViT-L text encoder, 768-wide context; v2: OpenCLIP ViT-H, 1024 wide, linear projections;
inpainting: 9 UNet input channels) is read from the weights. Writes latentdiff model folders
(``save_model_folder``) and diffusers folders. No weights are ever downloaded.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import UserError
from latentdiff.formats import sd_keys
from latentdiff.formats.checkpoint import (load_into, load_json, load_json_object, load_tensors, load_weights_only,
                                           save_json, save_tensors)
from latentdiff.formats.clip_keys import (clip_text_config_from_hf, clip_text_config_to_hf, clip_text_from_hf,
                                          clip_text_to_hf)
from latentdiff.formats.sd_configs import (unet_config_from_diffusers, unet_config_to_diffusers,
                                           vae_config_from_diffusers, vae_config_to_diffusers)
from latentdiff.formats.single_file_config import (PREDICTIONS, TEXT_SHAPE_KEYS, UNET_HEAD_KEYS, UNET_SHAPE_KEYS,
                                                   VAE_SHAPE_KEYS, config_from_metadata, merge_guess, read_config,
                                                   scheduler_config_from_diffusers)
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPTextTransformer
from latentdiff.models.concat import ConcatKind
from latentdiff.models.conditioning import CondKind, Conditioner
from latentdiff.models.folder import MANIFEST, Conditioning, Manifest, save_model_folder
from latentdiff.models.settings import SampleSettings
from latentdiff.models.tokenizer import CLIPTokenizer
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.pipelines.generate import Pipeline

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
DEFAULT_GUIDANCE = 7.5  # what SD's reference scripts and diffusers use
EXTRAS = "extras/single_file.safetensors"  # a single file's tensors no component reads, kept by `convert`
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
Tensors = dict[str, torch.Tensor]


# ---- reading files safely --------------------------------------------------------------------------
def read_checkpoint(path: Path | str) -> tuple[Tensors, dict[str, Any]]:
    """Tensors of a ``.safetensors`` or a pickled ``.ckpt``/``.pt``/``.bin`` file, and any plain metadata.

    Pickles are opened with ``weights_only=True``: only tensors and plain containers are rebuilt, and a
    file that would need anything else (code, custom classes) is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        tensors = load_tensors(path)
        with safe_open(path, "pt") as f:
            return tensors, dict(f.metadata() or {})
    obj = load_weights_only(path)
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if isinstance(v, (int, float, str))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a mapping of names to tensors (optionally under 'state_dict')")
    return obj, meta


def _sub(state: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _fp32(state: Tensors) -> Tensors:
    """Half-precision files are widened: parity and the VAE need fp32 (cast later with ``dtype``)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load(model: torch.nn.Module, state: Tensors, where: str) -> torch.nn.Module:
    load_into(model, _fp32(state), where)
    return model.eval().requires_grad_(False)


# ---- the parts ---------------------------------------------------------------------------------------
def _clip_guess(weights: Tensors, act: str, where: str, heads_given: bool) -> dict[str, Any]:
    """A text tower's config read from its weights (our key names); CLIP's text heads are 64 wide."""
    tokens = weights["token_embedding.weight"]
    width = tokens.shape[1]
    if width % 64 and not heads_given:
        raise UserError(f"{where}: the text encoder is {width} wide, which CLIP's 64-wide heads do not divide: "
                        "give the model's config with --config")
    return {"vocab_size": tokens.shape[0], "context_length": weights["position_embedding.weight"].shape[0],
            "width": width, "layers": len({k.split(".")[1] for k in weights if k.startswith("blocks.")}),
            "heads": max(1, width // 64), "intermediate_size": weights["blocks.0.mlp.fc1.weight"].shape[0],
            "act": act, "projection_dim": width}


def _hf_layers(state: Tensors) -> int:
    return len({m.group(1) for k in state if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})


def _text_encoder_from_single_file(hf: Tensors, open_clip: Tensors, given: dict[str, Any], where: str,
                                   tokenizer: CLIPTokenizer | None) -> CLIPTextEncoder:
    """SD v1's transformers-layout CLIP (``hf``) or SD v2's OpenCLIP text tower, with the CLIP BPE tokenizer.

    SD v1 reads the last block, SD v2 the penultimate one; a config (``given``) may say otherwise.
    """
    text = given.get("text", {})
    if hf:  # OpenAI CLIP ViT-L/14
        used = text.get("layers", _hf_layers(hf) - given.get("text_skip", 0))
        hf = {k: v for k, v in hf.items() if not (m := re.search(r"encoder\.layers\.(\d+)\.", k)) or int(m.group(1)) < used}
        weights, act, pad = clip_text_from_hf(hf), "quick_gelu", "<|endoftext|>"
    elif open_clip:  # open_clip pads with id 0 ('!'), not end-of-text
        used = text.get("layers", sd_keys.open_clip_text_layers(open_clip) - given.get("text_skip", 1))
        weights, act, pad = sd_keys.clip_text_from_open_clip(open_clip, used), "gelu", 0
    else:
        raise UserError(f"{where}: no text encoder: expected keys {TEXT_PREFIX}transformer.* (SD v1) or "
                        f"{TEXT_PREFIX}model.* (SD v2)")
    guess = _clip_guess(weights, act, where, "heads" in text)
    cfg = CLIPTextConfig(**merge_guess(guess, text, TEXT_SHAPE_KEYS, "clip.text", where, ("heads",)))
    model = _load(CLIPTextTransformer(cfg), weights, f"{where}: text encoder")
    return CLIPTextEncoder(tokenizer or CLIPTokenizer.default(cfg.context_length, pad), model)


def _manifest(unet_cfg: UNetConfig, vae: Autoencoder, diffusion: DiffusionConfig, image_size: int,
              source: str) -> Manifest:
    """What a Stable Diffusion checkpoint says about itself, as a latentdiff model folder's manifest."""
    inpaint = unet_cfg.in_channels == 2 * vae.latent_channels + 1
    f = vae.downsample_factor
    return Manifest(image_size=image_size, channels=3, components=("autoencoder", "text_encoder", "unet"),
                    diffusion=diffusion, latent_shape=(vae.latent_channels, image_size // f, image_size // f),
                    conditioning=Conditioning(CondKind.TEXT, DEFAULT_GUIDANCE), source=source,
                    concat=ConcatKind.INPAINT if inpaint else None)


def _pipeline(unet: UNet, vae: Autoencoder, text: CLIPTextEncoder, diffusion: DiffusionConfig, image_size: int,
              path: Path, source: str, device: str | torch.device) -> Pipeline:
    if text.width != unet.config.context_dim:
        raise UserError(f"{path}: the text encoder is {text.width} wide but the UNet's cross-attention reads "
                        f"{unet.config.context_dim}: the components come from different models")
    latent_in = unet.config.in_channels
    if latent_in not in (vae.latent_channels, 2 * vae.latent_channels + 1):
        raise UserError(f"{path}: the UNet takes {latent_in} input channels but the VAE makes "
                        f"{vae.latent_channels}-channel latents (expected {vae.latent_channels}, or "
                        f"{2 * vae.latent_channels + 1} for inpainting)")
    manifest = _manifest(unet.config, vae, diffusion, image_size, source)
    unet, vae, text = unet.to(device), vae.to(device), text.to(device)
    return Pipeline(unet, vae, Conditioner(unet.config, text, device), manifest, path, torch.device(device))


def load_single_file(path: Path | str, device: str | torch.device = "cpu", prediction: str | None = None,
                     tokenizer: Path | str | None = None, config: Path | str | None = None) -> Pipeline:
    """A Stable Diffusion v1/v2 (or inpainting) single-file checkpoint as a Pipeline.

    Widths and levels come from the tensor shapes; head counts, GroupNorm groups and the schedule from
    ``config`` (a diffusers folder, a config.json or a CompVis YAML: formats/single_file_config.py), else
    from the configs latentdiff's writer keeps in the file's metadata, else SD's convention (v1: 8
    heads, v2: 64-wide heads, 32 groups). Weights that contradict the guess are a one-line UserError.
    ``prediction`` (eps or v) overrides what is read: SD v2 checkpoints are v-prediction 768 px models
    except the 512 px base model (``global_step`` 875000 in its ``.ckpt``), as diffusers decides too.
    ``tokenizer``: a folder with vocab.json + merges.txt (default: the CLIP vocabulary latentdiff ships).
    """
    path = Path(path)
    state, meta = read_checkpoint(path)
    given = read_config(config) if config is not None else config_from_metadata(meta, str(path))
    unet_sd = _sub(state, UNET_PREFIX)  # model_ema.* (EMA copies some files carry) is not read
    vae_sd = {k: v for k, v in _sub(state, VAE_PREFIX).items() if not k.startswith("loss.")}  # training-only LPIPS/GAN
    if not unet_sd or not vae_sd:
        some = ", ".join(sorted(state)[:3])
        raise UserError(f"{path}: not a Stable Diffusion single-file checkpoint: expected keys "
                        f"{UNET_PREFIX}*, {VAE_PREFIX}* and {TEXT_PREFIX}* (found e.g. {some})")
    hf, open_clip = _sub(state, TEXT_PREFIX + "transformer."), _sub(state, TEXT_PREFIX + "model.")
    v2 = not hf  # SD v2's OpenCLIP text tower sits at cond_stage_model.model
    unet_given = given.get("unet", {})
    hint = "" if any(k in unet_given for k in UNET_HEAD_KEYS) else (
        f" (head counts follow SD {'v2' if v2 else 'v1'}'s convention, {'64-wide heads' if v2 else '8 heads'}: "
        "give the model's config with --config)")
    try:
        unet_kw = merge_guess(sd_keys.unet_config_from_compvis(unet_sd, v2), unet_given, UNET_SHAPE_KEYS, "unet",
                              str(path), UNET_HEAD_KEYS)
        unet = _load(UNet(UNetConfig(**unet_kw)), unet_sd, f"{path}: UNet")
    except UserError as e:
        raise UserError(f"{e}{hint}") from None
    vae_kw = merge_guess(sd_keys.vae_config_from_compvis(vae_sd), given.get("autoencoder", {}), VAE_SHAPE_KEYS,
                         "autoencoder", str(path))
    vae = _load(Autoencoder(AutoencoderConfig(**vae_kw)), vae_sd, f"{path}: autoencoder")
    tok = CLIPTokenizer.from_folder(tokenizer) if tokenizer else None
    text = _text_encoder_from_single_file(hf, open_clip, given, str(path), tok)
    guessed = "v" if v2 and meta.get("global_step") != 875000 else "eps"
    settings = {"schedule": "scaled_linear", "num_timesteps": 1000, "prediction": guessed} | given.get("diffusion", {})
    diffusion = DiffusionConfig(**settings | ({"prediction": prediction} if prediction else {}))
    if given.get("latent_size"):
        size = int(given["latent_size"]) * vae.downsample_factor
    else:
        size = 768 if v2 and diffusion.prediction == "v" else 512  # the default; each call may ask for another size
    version = "v2" if v2 else "v1"
    return _pipeline(unet, vae, text, diffusion, size, path, f"stable-diffusion {version} single file", device)


def _unet_keys(unet: UNet) -> dict[str, str]:
    """Our UNet's CompVis key -> diffusers key."""
    return sd_keys.unet_key_map(unet.state_dict(), unet.layout)


def _vae_keys(vae: Autoencoder) -> dict[str, str]:
    """Our autoencoder's CompVis key -> diffusers key."""
    return sd_keys.vae_key_map(vae.state_dict(), vae.config)


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILES[:2])})")


def _scheduler(folder: Path) -> DiffusionConfig:
    path = folder / "scheduler" / "scheduler_config.json"
    path = folder / "scheduler" / "scheduler_config.json"
    return DiffusionConfig(**scheduler_config_from_diffusers(load_json_object(path) if path.is_file() else {}, str(path)))


def load_diffusers_folder(path: Path | str, device: str | torch.device = "cpu",
                          prediction: str | None = None) -> Pipeline:
    """A diffusers StableDiffusion(Inpaint)Pipeline folder as a Pipeline."""
    path = Path(path)
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer")
               if not (path / p).exists()]
    if missing:
        raise UserError(f"{path}: not a complete diffusers Stable Diffusion folder: missing {', '.join(missing)}")
    unet_json = load_json_object(path / "unet" / "config.json")
    unet_cfg = UNetConfig(**unet_config_from_diffusers(unet_json, str(path / "unet" / "config.json")))
    file = _weights_in(path / "unet")
    unet = UNet(unet_cfg)
    unet = _load(unet, sd_keys.unet_from_diffusers(read_checkpoint(file)[0], _unet_keys(unet)), str(file))
    vae_cfg = AutoencoderConfig(**vae_config_from_diffusers(load_json_object(path / "vae" / "config.json"),
                                                            str(path / "vae" / "config.json")))
    file = _weights_in(path / "vae")
    vae = Autoencoder(vae_cfg)
    vae = _load(vae, sd_keys.vae_from_diffusers(read_checkpoint(file)[0], _vae_keys(vae)), str(file))
    where = path / "text_encoder" / "config.json"
    text_cfg = CLIPTextConfig(**clip_text_config_from_hf(load_json_object(where), str(where)))
    file = _weights_in(path / "text_encoder")
    text_model = _load(CLIPTextTransformer(text_cfg), clip_text_from_hf(read_checkpoint(file)[0]), str(file))
    text = CLIPTextEncoder(CLIPTokenizer.from_folder(path / "tokenizer"), text_model)
    diffusion = _scheduler(path)
    if prediction is not None:
        diffusion.prediction = prediction
    size = int(unet_json.get("sample_size", 64)) * vae.downsample_factor
    return _pipeline(unet, vae, text, diffusion, size, path, "stable-diffusion diffusers folder", device)


def is_diffusers_folder(path: Path) -> bool:
    """A folder in diffusers' pipeline layout (not a latentdiff model folder)."""
    if (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return True
    index = path / MANIFEST
    if not index.is_file():
        return False
    manifest = load_json(index)
    return isinstance(manifest, dict) and "_class_name" in manifest


def load_any(path: Path | str, device: str | torch.device = "cpu", prediction: str | None = None,
             tokenizer: Path | str | None = None, config: Path | str | None = None) -> Pipeline:
    """A latentdiff model folder, a diffusers folder or a single-file SD checkpoint, told apart by content.

    ``prediction`` (eps or v) overrides what a Stable Diffusion checkpoint says it predicts; ``tokenizer``
    and ``config`` apply to single files (see :func:`load_single_file`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a latentdiff model folder, a diffusers folder or a "
                        ".safetensors/.ckpt checkpoint")
    if path.is_dir() and (tokenizer is not None or config is not None):
        raise UserError(f"{path}: --tokenizer and --config apply to single-file checkpoints; a folder has its own")
    if path.is_dir():
        if is_diffusers_folder(path):
            return load_diffusers_folder(path, device, prediction)
        if prediction is not None:
            raise UserError(f"{path}: --prediction only applies to Stable Diffusion checkpoints")
        return Pipeline.load(path, device)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: not a model folder or a .safetensors/.ckpt checkpoint")
    return load_single_file(path, device, prediction, tokenizer, config)


# ---- writing -----------------------------------------------------------------------------------------
def save_latentdiff(pipe: Pipeline, folder: Path | str, image_size: int | None = None) -> None:
    """Write a loaded pipeline as a latentdiff model folder (safetensors + JSON); ``image_size``: the default
    side stored in it (else the pipeline's own).

    A single file's tensors that no component reads go to ``extras/`` (sd_single_file.py), so that
    writing the folder back as a single file gives the same tensors.
    """
    from latentdiff.pipelines.sd_single_file import single_file_state, source_extras  # it builds on this module

    manifest = resized_manifest(pipe, image_size)
    components = {"unet": (pipe.unet.config.to_dict(), pipe.unet.state_dict()),
                  "autoencoder": (pipe.autoencoder.config.to_dict(), pipe.autoencoder.state_dict())}
    extras = {}
    if Path(pipe.path).is_file():
        state, made_up = single_file_state(pipe)
        extras = source_extras(pipe, set(state), made_up)
    if extras:
        save_tensors(extras, Path(folder) / EXTRAS)
    save_model_folder(folder, components, manifest, {"text_encoder": pipe.cond.text_encoder.save})


def resized_manifest(pipe: Pipeline, image_size: int | None) -> Manifest:
    """The pipeline's manifest with another default image size (checked) and the latent shape that goes with it."""
    m = pipe.manifest
    if image_size is None:
        return m
    sized = pipe.check(SampleSettings(width=image_size, height=image_size))
    return dataclasses.replace(m, image_size=image_size, latent_shape=pipe.latent_shape(sized))


def save_diffusers(pipe: Pipeline, folder: Path | str, image_size: int | None = None) -> None:
    """Write a text-to-image pipeline in diffusers' folder layout (loadable by StableDiffusionPipeline);
    ``image_size``: the default side stored in it (else the pipeline's own)."""
    folder = Path(folder)
    size = resized_manifest(pipe, image_size).image_size
    text = pipe.cond.text_encoder
    if not isinstance(text, CLIPTextEncoder) or not isinstance(text.tokenizer, CLIPTokenizer):
        raise UserError("diffusers folders need a CLIP text encoder with the CLIP BPE tokenizer; this model "
                        f"uses {type(text).__name__}")
    unet_cfg, vae_cfg, text_cfg = pipe.unet.config, pipe.autoencoder.config, text.text_model.config
    unet_json = unet_config_to_diffusers(unet_cfg, pipe.unet.layout) | {
        "sample_size": size // pipe.autoencoder.downsample_factor}
    save_tensors(sd_keys.unet_to_diffusers(pipe.unet.state_dict(), _unet_keys(pipe.unet)),
                 folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_json(unet_json, folder / "unet" / "config.json")
    save_tensors(sd_keys.vae_to_diffusers(pipe.autoencoder.state_dict(), _vae_keys(pipe.autoencoder)),
                 folder / "vae" / "diffusion_pytorch_model.safetensors")
    save_json(vae_config_to_diffusers(vae_cfg) | {"sample_size": size},
              folder / "vae" / "config.json")
    save_tensors(clip_text_to_hf(text.text_model.state_dict()), folder / "text_encoder" / "model.safetensors")
    save_json(clip_text_config_to_hf(text_cfg, text.tokenizer), folder / "text_encoder" / "config.json")
    text.tokenizer.save(folder / "tokenizer")
    d = pipe.diffusion
    if d.schedule not in ("linear", "scaled_linear"):
        raise UserError(f"diffusers' schedulers take linear or scaled_linear betas here, not {d.schedule!r}")
    start, end = (d.beta_start or 0.00085, d.beta_end or 0.012) if d.schedule == "scaled_linear" else (
        d.beta_start or 1e-4, d.beta_end or 0.02)
    save_json({"_class_name": "DDIMScheduler", "beta_schedule": d.schedule, "beta_start": start, "beta_end": end,
               "num_train_timesteps": d.num_timesteps, "clip_sample": False, "set_alpha_to_one": False,
               "steps_offset": 1, "prediction_type": {v: k for k, v in PREDICTIONS.items()}[d.prediction]},
              folder / "scheduler" / "scheduler_config.json")
    inpaint = pipe.concat_kind is ConcatKind.INPAINT
    save_json({"_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
               "feature_extractor": [None, None], "requires_safety_checker": False},
              folder / MANIFEST)
