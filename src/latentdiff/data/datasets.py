"""Datasets held in memory as compact uint8 tensors: the record, and which source loads it.

The sources live beside this file: `embedded.py` (the data sets that ship with the code) and `folders.py`
(a folder of image files, with `decode.py` and `captions.py`), `shard_set.py` (WebDataset shards).
`SOURCES` names the embedded ones; any other data.source is a folder path. `open_dataset` is what training
calls: it streams from disk instead (`streamed.py`) when data.stream says so or the source is a shard set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from latentdiff.data import embedded
from latentdiff.data.config import DataConfig
from latentdiff.data.folders import load_folder
from latentdiff.data.shard_set import is_shard_set
from latentdiff.data.source import SourceImages, check_memory, fingerprint_settings
from latentdiff.data.streamed import StreamedImages, open_streamed
from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError

log = logging.getLogger(__name__)

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


def streams(cfg: DataConfig) -> bool:
    """Whether ``cfg``'s images are read from disk as needed: data.stream, else for shard sets and buckets."""
    if cfg.stream is not None:
        return cfg.stream
    return not cfg.is_embedded and (cfg.buckets is not None or is_shard_set(Path(cfg.source).expanduser()))


def open_dataset(cfg: DataConfig, min_bucket: int = 1) -> ImageData | StreamedImages:
    """The data set to train on: streamed from disk (see :func:`streams`) or loaded into memory."""
    return open_streamed(cfg, min_bucket) if streams(cfg) else load_dataset(cfg)


def load_dataset(cfg: DataConfig) -> ImageData:
    """Load the images `cfg` describes into memory (nothing is cached on disk)."""
    if cfg.buckets is not None:
        raise UserError("data.buckets: images of several sizes are streamed, not held in memory (data.stream)")
    default = load_shards if is_shard_set(Path(cfg.source).expanduser()) else load_folder
    got = SOURCES.get(cfg.source, default)(cfg)
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


def load_shards(cfg: DataConfig) -> SourceImages:
    """A set of WebDataset shards decoded into memory (data.stream=false), unreadable images skipped."""
    data = open_streamed(cfg)
    n_max = len(data)
    check_memory(n_max, cfg.channels, cfg.image_size)
    out = np.empty((n_max, cfg.channels, cfg.image_size, cfg.image_size), np.uint8)
    kept: list[int] = []
    n_bad, first_bad = 0, ""
    for i in range(n_max):
        try:
            out[len(kept)] = data.decode(i)
            kept.append(i)
        except UserError:
            raise
        except Exception as e:  # any decoder error means a bad file, as for folders
            if cfg.on_bad_file == "fail":
                raise UserError(f"{data.where(i)}: cannot read image ({type(e).__name__}: {e})") from None
            n_bad, first_bad = n_bad + 1, first_bad or f"{data.where(i)} ({type(e).__name__}: {e})"
    if not kept:
        raise UserError(f"{cfg.source}: no decodable images ({n_bad} bad, first: {first_bad})")
    if n_bad:
        log.warning("%s: skipped %d unreadable image(s); first: %s", cfg.source, n_bad, first_bad)
    rows = np.array(kept)
    return SourceImages(torch.from_numpy(out[: len(kept)].copy() if n_bad else out),
                        data.labels[rows] if data.labels is not None else None, data.class_names,
                        [data.index.names[i] for i in kept],
                        [data.captions[i] for i in kept] if data.captions is not None else None)


def _fingerprint(cfg: DataConfig, images: torch.Tensor, labels: torch.Tensor | None, names: list[str],
                 captions: list[str] | None = None) -> str:
    settings = fingerprint_settings(cfg)
    h = hashlib.sha256(json.dumps([settings, names, list(images.shape)], sort_keys=True).encode())
    h.update(images.contiguous().numpy())
    if labels is not None:
        h.update(labels.contiguous().numpy())
    if captions is not None:
        h.update(json.dumps(captions).encode())
    return h.hexdigest()
