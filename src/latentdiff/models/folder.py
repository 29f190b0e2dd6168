"""The model folder: one sub-folder per component (``config.json`` + ``model.safetensors``) and a manifest.

``model_index.json`` says which components exist and holds what the pipeline needs beside the weights
(diffusion settings, image size and channels, class names, training step): a typed, frozen
:class:`Manifest`, read by the strict dataclass reader so a wrong type names the file and key. No pickles.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import (load_into, load_json_object, load_tensors, naming_file, save_json,
                                          save_tensors)
from latentdiff.formats.dataclass_io import ValueEnum, build_dataclass, to_plain
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.models.concat import ConcatKind
from latentdiff.models.conditioning import CondKind
from latentdiff.models.unet import UNet, UNetConfig

MANIFEST = "model_index.json"
FORMAT_VERSION = 1


class FolderKind(ValueEnum):
    """What a model folder holds: a diffusion pipeline, an autoencoder alone, or a CLIP model."""

    DIFFUSION = "diffusion"
    AUTOENCODER = "autoencoder"
    CLIP = "clip"


@dataclass(frozen=True)
class DataInfo:
    """The data set a model was trained on (for evaluation against its held-out split)."""

    source: str
    fingerprint: str = ""
    images: int = 0


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is told and the guidance scale sampling uses by default."""

    kind: CondKind = CondKind.NONE
    guidance: float = 1.0
    guidance_max_t: Optional[float] = None  # guided steps: t <= max_t (cond.guidance_max_t); None: all


@dataclass(frozen=True)
class Manifest:
    """``model_index.json``: what a pipeline needs beside the weights. Optional fields absent from the file
    are None (an autoencoder folder has no diffusion settings; only a super-resolution model a low_res_size)."""

    image_size: int  # the default side of generated (or reconstructed) images, in pixels
    channels: int  # image channels: 1 grey, 3 RGB
    components: tuple[str, ...] = ()  # sub-folders, written by save_model_folder
    format: str = "latentdiff"
    version: int = FORMAT_VERSION
    kind: FolderKind = FolderKind.DIFFUSION
    step: Optional[int] = None  # training steps behind the weights
    diffusion: Optional[DiffusionConfig] = None
    latent_shape: Optional[tuple[int, ...]] = None  # (C, h, w) the UNet denoises at image_size
    conditioning: Optional[Conditioning] = None  # diffusion folders: what the UNet is told
    concat: Optional[ConcatKind] = None  # models/concat.py; None: no concat conditioning
    low_res_size: Optional[int] = None  # concat=low_res: side of the low-resolution input
    class_names: Optional[tuple[str, ...]] = ()  # older folders may say null: no names
    source: Optional[str] = None  # where converted weights came from ("stable-diffusion v1 single file")
    data: Optional[DataInfo] = None
    scale_factor: Optional[float] = None  # autoencoder folders: the latent scale s
    context_length: Optional[int] = None  # CLIP folders: the text tower's context and width
    width: Optional[int] = None
    caption_template: Optional[str] = None
    buckets: Optional[tuple[tuple[int, int], ...]] = None  # data.buckets: the trained (width, height) sizes

    @property
    def guidance(self) -> float:
        """The guidance scale sampling uses by default: the model's own, 1 (none) for unconditional models."""
        c = self.conditioning
        return c.guidance if c is not None and c.kind is not CondKind.NONE else 1.0

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk: enums as strings, tuples as lists, None fields (nested too) left out."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain = {k: {a: b for a, b in dataclasses.asdict(v).items() if b is not None}  # None: absent, as above
                 if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                 for k, v in plain.items() if v is not None}
        return to_plain(plain)

    def check(self, where: str) -> "Manifest":
        """Refuse combinations no pipeline can use, naming ``where`` (the file) and the key."""
        if self.kind is FolderKind.DIFFUSION and "unet" in self.components and self.diffusion is None:
            raise UserError(f"{where}: diffusion: missing (a folder with a unet needs its diffusion settings)")
        if self.concat is ConcatKind.LOW_RES and not (self.low_res_size or 0) > 0:
            raise UserError(f"{where}: low_res_size: a super-resolution model (concat low_res) needs a positive "
                            f"low_res_size, got {self.low_res_size!r}")
        for key in ("image_size", "channels"):
            if getattr(self, key) < 1:
                raise UserError(f"{where}: {key}: must be positive, got {getattr(self, key)}")
        return self


def save_component(folder: Path, name: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write ``folder/name/config.json`` and ``folder/name/model.safetensors`` atomically."""
    save_tensors(state, folder / name / "model.safetensors")
    save_json(config, folder / name / "config.json")


def save_model_folder(folder: Path | str, components: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]],
                      manifest: Manifest, savers: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Export a trained pipeline: ``components`` maps a name to (config, state_dict).

    ``savers`` maps further component names to functions that write their own folder (a text encoder
    with its tokenizer). The manifest is written last, so a folder that has one is complete.
    """
    folder = Path(folder)
    for name, (config, state) in components.items():
        save_component(folder, name, config, state)
    for name, save in (savers or {}).items():
        save(folder / name)
    names = tuple(sorted([*components, *(savers or {})]))
    save_json(dataclasses.replace(manifest, components=names).to_json(), folder / MANIFEST)


def read_manifest(folder: Path | str) -> Manifest:
    """The manifest of a model folder, with a clear error when the folder is not one or a value is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not os.path.lexists(path):
        hint = " (training has not written a model yet)" if (folder / "config.yaml").is_file() else ""
        raise UserError(f"{folder} is not a latentdiff model folder: {MANIFEST} not found{hint}")
    data = load_json_object(path)
    if data.get("format") != "latentdiff" or data.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported format {data.get('format')!r} "
                        f"version {data.get('version')!r} (expected latentdiff version {FORMAT_VERSION})")
    manifest = build_dataclass(Manifest, data, f"{path}:", float_strings=False)
    return dataclasses.replace(manifest, class_names=manifest.class_names or ()).check(str(path))


def load_component_config(folder: Path | str, name: str, config_cls: Any) -> Any:
    """``folder/name/config.json`` as ``config_cls``; errors name the file."""
    path = Path(folder) / name / "config.json"
    with naming_file(path):
        return config_cls.from_dict(load_json_object(path), float_strings=False)


def _load_component(folder: Path | str, name: str, config_cls: Any, model_cls: Any,
                    device: str | torch.device) -> Any:
    sub = Path(folder) / name
    if not sub.is_dir():
        raise UserError(f"{folder} has no {name}/ component folder")
    model = model_cls(load_component_config(folder, name, config_cls))
    load_into(model, load_tensors(sub / "model.safetensors"), str(sub / "model.safetensors"))
    return model.to(device).eval()


def load_unet(folder: Path | str, device: str | torch.device = "cpu") -> UNet:
    """Rebuild the UNet from ``folder/unet/config.json`` and load its weights, checking every key."""
    return _load_component(folder, "unet", UNetConfig, UNet, device)


def load_autoencoder(folder: Path | str, device: str | torch.device = "cpu") -> Autoencoder:
    """Rebuild the autoencoder from ``folder/autoencoder/`` (a diffusion model folder or an autoencoder's own)."""
    return _load_component(folder, "autoencoder", AutoencoderConfig, Autoencoder, device)
