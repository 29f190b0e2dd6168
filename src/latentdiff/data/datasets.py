"""Datasets held in memory as compact uint8 tensors: the record, and which source loads it.

The sources live beside this file: `embedded.py` (the data sets that ship with the code) and `folders.py`
(a folder of image files, with `decode.py` and `captions.py`). `SOURCES` names the embedded ones; any
other data.source is a folder path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentdiff.data import embedded
from latentdiff.data.config import DataConfig
from latentdiff.data.folders import load_folder
from latentdiff.data.source import SourceImages
from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError

SOURCES: dict[str, Callable[[DataConfig], SourceImages]] = {
    "mnist5k": embedded.load_mnist5k,
    "digits": embedded.load_digits,
    "fashion-mnist": embedded.load_fashion_mnist,
    "emoji": embedded.load_emoji,
    "shapes": embedded.load_shapes,
}  # the names of data.config.EMBEDDED; any other data.source is a folder (load_folder)


@dataclass
class ImageData:
    """Images as uint8 N x C x H x W (compact in memory), optional int64 labels, and their names."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    fingerprint: str  # sha256 over the settings and the pixels; keys caches such as latents
    source: str
    files: list[str] = field(default_factory=list)  # folder sources: relative path of each image
    captions: list[str] | None = None  # one caption per image for text-conditional training

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Float batch in [-1, 1] for the given indices (augmentation such as random_hflip: caller's)."""
        return from_uint8_image(self.images[idx])


def load_dataset(cfg: DataConfig) -> ImageData:
    """Load the images `cfg` describes into memory (nothing is cached on disk)."""
    got = SOURCES.get(cfg.source, load_folder)(cfg)
    captions = got.captions
    if cfg.captions == "ignore":
        captions = None
    elif cfg.captions == "require" and captions is None:
        raise UserError(f"data.captions='require' but data.source {cfg.source!r} has no captions")
    return ImageData(
        images=got.images,
        labels=got.labels,
        class_names=got.class_names,
        fingerprint=_fingerprint(cfg, got.images, got.labels, got.class_names, captions),
        source=cfg.source,
        files=got.files,
        captions=captions,
    )


def _fingerprint(cfg: DataConfig, images: torch.Tensor, labels: torch.Tensor | None, names: list[str],
                 captions: list[str] | None = None) -> str:
    # Only what shapes the pixels and labels: moving a folder, pointing fashion_mnist_dir elsewhere,
    # or toggling hflip / on_bad_file keeps the fingerprint, and so any cache or resume keyed on it.
    # The caption settings act through the captions themselves, which are hashed below.
    settings = cfg.to_dict()
    for key in ("fashion_mnist_dir", "hflip", "on_bad_file", "captions", "caption_column", "emoji_font"):
        settings.pop(key)
    if cfg.source != "shapes":  # shapes-only settings: other sources' fingerprints stay as they were
        for key in ("shapes_count", "two_object_fraction"):
            settings.pop(key)
    if not cfg.is_embedded:
        settings["source"] = "folder"
    h = hashlib.sha256(json.dumps([settings, names, list(images.shape)], sort_keys=True).encode())
    h.update(images.contiguous().numpy())
    if labels is not None:
        h.update(labels.contiguous().numpy())
    if captions is not None:
        h.update(json.dumps(captions).encode())
    return h.hexdigest()
