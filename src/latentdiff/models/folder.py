"""The model folder: one sub-folder per component (``config.json`` + ``model.safetensors``) and a manifest.

``model_index.json`` says which components exist and holds what the pipeline needs beside the weights
(diffusion settings, image size and channels, class names, training step). No pickles anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_into, load_json, load_tensors, save_json, save_tensors
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.models.unet import UNet, UNetConfig

MANIFEST = "model_index.json"
FORMAT_VERSION = 1


def save_component(folder: Path, name: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write ``folder/name/config.json`` and ``folder/name/model.safetensors`` atomically."""
    save_tensors(state, folder / name / "model.safetensors")
    save_json(config, folder / name / "config.json")


def save_model_folder(folder: Path | str, components: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]],
                      manifest: dict[str, Any], savers: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Export a trained pipeline: ``components`` maps a name to (config, state_dict).

    ``savers`` maps further component names to functions that write their own folder (a text encoder
    with its tokenizer). The manifest is written last, so a folder that has one is complete.
    """
    folder = Path(folder)
    for name, (config, state) in components.items():
        save_component(folder, name, config, state)
    for name, save in (savers or {}).items():
        save(folder / name)
    names = sorted([*components, *(savers or {})])
    save_json({"format": "latentdiff", "version": FORMAT_VERSION, "components": names, **manifest},
              folder / MANIFEST)


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The manifest of a model folder, with a clear error when the folder is not one."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        hint = " (training has not written a model yet)" if (folder / "config.yaml").is_file() else ""
        raise UserError(f"{folder} is not a latentdiff model folder: {MANIFEST} not found{hint}")
    manifest = load_json(folder / MANIFEST)
    if manifest.get("format") != "latentdiff" or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{folder / MANIFEST}: unsupported format {manifest.get('format')!r} "
                        f"version {manifest.get('version')!r} (expected latentdiff version {FORMAT_VERSION})")
    return manifest


def _load_component(folder: Path | str, name: str, config_cls: Any, model_cls: Any,
                    device: str | torch.device) -> Any:
    sub = Path(folder) / name
    if not sub.is_dir():
        raise UserError(f"{folder} has no {name}/ component folder")
    model = model_cls(config_cls.from_dict(load_json(sub / "config.json")))
    load_into(model, load_tensors(sub / "model.safetensors"), str(sub / "model.safetensors"))
    return model.to(device).eval()


def load_unet(folder: Path | str, device: str | torch.device = "cpu") -> UNet:
    """Rebuild the UNet from ``folder/unet/config.json`` and load its weights, checking every key."""
    return _load_component(folder, "unet", UNetConfig, UNet, device)


def load_autoencoder(folder: Path | str, device: str | torch.device = "cpu") -> Autoencoder:
    """Rebuild the autoencoder from ``folder/autoencoder/`` (a diffusion model folder or an autoencoder's own)."""
    return _load_component(folder, "autoencoder", AutoencoderConfig, Autoencoder, device)
