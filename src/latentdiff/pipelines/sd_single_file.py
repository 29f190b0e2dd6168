"""Writing a pipeline as one Stable Diffusion single file: the CompVis / A1111 key layout, in safetensors.

``model.diffusion_model.*`` (our UNet's own names), ``first_stage_model.*`` (the VAE's) and the text
encoder at ``cond_stage_model.transformer.*`` (SD v1's OpenAI CLIP, transformers' names) or
``cond_stage_model.model.*`` (SD v2's OpenCLIP tower, q/k/v packed into ``in_proj``), chosen by the
tower's activation (quick_gelu: v1, gelu: v2). What a single file cannot say (heads, groups, schedule)
goes into the file's metadata, where latentdiff reads it back; other tools use SD's conventions.

Tensors of the source single file that no component reads (a v2 file's last text block and projection,
position ids, the noise-schedule buffers CompVis saves) are carried along: kept in a latentdiff folder
(``extras/single_file.safetensors``) and written back, so single file -> folder -> single file is
tensor-equal. EMA copies (``model_ema.*``) and the VAE's training losses (``first_stage_model.loss.*``)
are dropped, as pruned files do.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from latentdiff.errors import UserError
from latentdiff.formats import sd_keys
from latentdiff.formats.checkpoint import load_tensors, save_tensors
from latentdiff.formats.clip_keys import clip_text_to_hf
from latentdiff.formats.single_file_config import METADATA_KEY
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.models.clip import CLIPTextEncoder
from latentdiff.models.tokenizer import CLIPTokenizer
from latentdiff.models.unet import UNetConfig
from latentdiff.pipelines.generate import Pipeline
from latentdiff.pipelines.stable_diffusion import (EXTRAS, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, Tensors,
                                                   read_checkpoint, resized_manifest)

DROPPED = ("model_ema.", VAE_PREFIX + "loss.")  # EMA duplicates and training-only losses: not carried along


def _text_encoder(pipe: Pipeline) -> CLIPTextEncoder:
    text = pipe.cond.text_encoder
    if not isinstance(text, CLIPTextEncoder) or not isinstance(text.tokenizer, CLIPTokenizer):
        raise UserError("a single file holds a CLIP text encoder read with the CLIP BPE tokenizer; this model uses "
                        f"{type(text).__name__}: convert it to a latentdiff folder instead")
    v2 = text.text_model.config.act == "gelu"
    pad = 0 if v2 else text.tokenizer.eos_id  # what a single file's reader assumes for its layout
    if text.tokenizer.pad_id != pad:
        raise UserError(f"the tokenizer pads with id {text.tokenizer.pad_id}, but a single file's SD "
                        f"{'v2' if v2 else 'v1'} text encoder is read padding with {pad}: keep this model as a folder")
    return text


def single_file_state(pipe: Pipeline) -> tuple[Tensors, set[str]]:
    """The pipeline's tensors under CompVis names, and the names of made-up ones (v2's unread last text block)."""
    if not isinstance(pipe.autoencoder, Autoencoder) or pipe.unet.config.context_dim is None:
        raise UserError("a Stable Diffusion single file holds a latent, text-conditional model (UNet with "
                        "cross-attention, KL autoencoder, CLIP text encoder)")
    text = _text_encoder(pipe)
    state = {UNET_PREFIX + k: v for k, v in pipe.unet.state_dict().items()}
    state |= {VAE_PREFIX + k: v for k, v in pipe.autoencoder.state_dict().items()}
    weights = text.text_model.state_dict()
    if text.text_model.config.act == "gelu":  # SD v2 reads the penultimate of the file's blocks
        tower, made_up = sd_keys.clip_text_to_open_clip(weights, text.text_model.config.layers + 1)
        prefix = TEXT_PREFIX + "model."
    else:
        tower, made_up, prefix = clip_text_to_hf(weights), set(), TEXT_PREFIX + "transformer."
    state |= {prefix + k: v for k, v in tower.items()}
    return state, {prefix + k for k in made_up}


def source_extras(pipe: Pipeline, written: set[str], made_up: set[str]) -> Tensors:
    """Tensors of the single file the pipeline came from that its components do not hold (see module doc)."""
    path = Path(pipe.path)
    if path.is_dir():
        return load_tensors(path / EXTRAS) if (path / EXTRAS).is_file() else {}
    if not path.is_file():
        return {}

    def wanted(key: str) -> bool:
        return (key not in written or key in made_up) and not key.startswith(DROPPED)

    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    return {k: v for k, v in read_checkpoint(path)[0].items() if wanted(k)}


def _metadata(pipe: Pipeline, image_size: int) -> dict[str, str]:
    """The configs a single file cannot hold, as JSON in the safetensors metadata."""
    text = pipe.cond.text_encoder.text_model.config
    configs = {"unet": pipe.unet.config.to_dict(), "autoencoder": pipe.autoencoder.config.to_dict(),
               "text": text.to_dict(), "diffusion": dataclasses.asdict(pipe.diffusion),
               "latent_size": image_size // pipe.autoencoder.downsample_factor}
    return {"format": "pt", METADATA_KEY: json.dumps(configs, sort_keys=True)}


def _warn_if_unconventional(pipe: Pipeline, state: Tensors) -> None:
    """Other tools read a single file by SD's conventions; say so when this model departs from them."""
    v2 = pipe.cond.text_encoder.text_model.config.act == "gelu"
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    try:
        guess = dataclasses.asdict(UNetConfig(**sd_keys.unet_config_from_compvis(unet, v2)))
    except UserError:  # SD's head convention does not even fit this UNet
        guess = {}
    text = pipe.cond.text_encoder.text_model.config
    differ = [k for k, v in dataclasses.asdict(pipe.unet.config).items() if guess.get(k, v) != v and k != "dropout"]
    differ += ["UNet heads"] if not guess else []
    differ += ["text heads"] if text.heads != max(1, text.width // 64) else []
    differ += ["VAE groups"] if pipe.autoencoder.config.norm_groups != 32 else []
    if differ:
        warnings.warn(f"this model differs from SD's conventions in {', '.join(differ)}: latentdiff reads the "
                      "file's metadata, other tools need the model's config beside the file", stacklevel=3)


def save_single_file(pipe: Pipeline, path: Path | str, half: bool = False, image_size: int | None = None) -> Path:
    """Write ``pipe`` as one SD single file (``.safetensors``); ``half``: floating tensors as float16;
    ``image_size``: the default side recorded in it (else the pipeline's own)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a single file is written as .safetensors (pickled .ckpt files are not written)")
    size = resized_manifest(pipe, image_size).image_size
    state, made_up = single_file_state(pipe)
    _warn_if_unconventional(pipe, state)
    state |= source_extras(pipe, set(state), made_up)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_tensors({k: v.to(torch.device("cpu")) for k, v in state.items()}, path, _metadata(pipe, size))
    return path
