"""LoRA files on a pipeline: ``load_lora(pipe, "style.safetensors", 0.8)``, several at once, fused or on the fly;
and the trainer of a new one on any base model (:func:`make_lora_trainer`).

The file's layers (formats/lora.py: kohya / A1111 or diffusers / PEFT) are matched to the UNet's and the
CLIP text encoder's modules by every name those answer to (models/lora.py); a layer the model does not
have is a UserError, except text-encoder blocks past the ones the model runs (SD v2 reads the
penultimate block, so a LoRA's last block never acts) which are skipped with a warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from latentdiff.errors import UserError
from latentdiff.formats.lora import read_lora
from latentdiff.models.clip import CLIPTextEncoder
from latentdiff.models.conditioning import CondKind
from latentdiff.models.lora import apply_lora, remove_lora, text_lora_names, unet_lora_names
from latentdiff.pipelines.generate import Pipeline
from latentdiff.pipelines.stable_diffusion import load_any, read_checkpoint
from latentdiff.training.lora_config import LoraRunConfig
from latentdiff.training.lora_trainer import LoraBase, LoraTrainer


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (the command line's --lora) -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def load_lora(pipe: Pipeline, path: Path | str, scale: float = 1.0, fuse: bool = True) -> int:
    """Apply the LoRA file ``path`` at strength ``scale`` to the pipeline's UNet and text encoder; the layer count."""
    path = Path(path)
    state, metadata = read_checkpoint(path)
    layers = read_lora(state, metadata, str(path))
    text = pipe.cond.text_encoder
    names = {"unet": unet_lora_names(pipe.unet)}
    if isinstance(text, CLIPTextEncoder):
        names["text"] = text_lora_names(text.text_model)
    targets: dict[str, list] = {"unet": [], "text": []}
    missing, unused = [], []
    for layer in layers:
        if layer.component == "text" and "text" not in names:
            raise UserError(f"{path} adapts a CLIP text encoder; {pipe.path} uses {type(text).__name__}")
        ours = names[layer.component].get(layer.name)
        if ours is not None:
            targets[layer.component].append((ours, layer.down, layer.up, scale * layer.scale))
        elif layer.component == "text" and _past_last_block(layer.name, text.text_model.config.layers):
            unused.append(layer.name)
        else:
            missing.append(f"{layer.component}:{layer.name}")
    if missing:
        raise UserError(f"{path}: {len(missing)} of its {len(layers)} layers are not in {pipe.path} (e.g. "
                        f"{', '.join(missing[:3])}): the LoRA was made for another model")
    if unused:
        warnings.warn(f"{path}: {len(unused)} text-encoder layers adapt blocks this model does not run; skipped")
    apply_lora(pipe.unet, targets["unet"], fuse, str(path))
    if targets["text"]:
        apply_lora(text.text_model, targets["text"], fuse, str(path))
    return len(targets["unet"]) + len(targets["text"])


def _past_last_block(name: str, layers: int) -> bool:
    m = re.search(r"encoder[._]layers[._](\d+)[._]", name)
    return m is not None and int(m.group(1)) >= layers


def unload_lora(pipe: Pipeline) -> list[str]:
    """Remove every LoRA from the pipeline, restoring the weights exactly; returns what was removed."""
    text = pipe.cond.text_encoder
    removed = remove_lora(pipe.unet)
    if isinstance(text, CLIPTextEncoder):
        removed += remove_lora(text.text_model)
    return removed


def make_lora_trainer(cfg: LoraRunConfig, out_dir: Path | str, resume: bool = False, device: str = "auto",
                      progress: bool | None = None) -> LoraTrainer:
    """The trainer of a LoRA run (training/lora_trainer.py) on the base model ``cfg.lora.base``, however stored."""
    lc = cfg.lora
    pipe = load_any(lc.base, "cpu", lc.prediction, lc.tokenizer, lc.config)
    if pipe.cond.kind is not CondKind.TEXT:
        raise UserError(f"lora.base {lc.base} is not a text-to-image model: a LoRA here learns from captions")
    base = LoraBase(pipe.unet, pipe.autoencoder, pipe.cond.text_encoder, pipe.diffusion, pipe.manifest.guidance,
                    str(lc.base))
    return LoraTrainer(cfg, out_dir, base, resume=resume, device=device, progress=progress)
