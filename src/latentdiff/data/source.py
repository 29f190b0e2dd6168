"""What every data source hands to `load_dataset`, and the rules all sources share (split, memory)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

from latentdiff.errors import UserError


@dataclass
class SourceImages:
    """One source's images as uint8 N x C x H x W, with whatever labels, files and captions it has."""

    images: torch.Tensor
    labels: torch.Tensor | None = None  # int64 class indices into class_names
    class_names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # folder sources: relative path of each image
    captions: list[str] | None = None  # one caption per image


def in_test(key: str) -> bool:
    """Deterministic held-out 10%: a fixed hash of the key, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10 == 0


def check_memory(n: int, channels: int, size: int) -> None:
    """Refuse a data set that cannot fit in memory before allocating it (numpy would fail with a traceback)."""
    need = n * channels * size * size
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): let numpy decide
        return
    if need > have:
        raise UserError(f"data.image_size={size}: {n} images of {channels}x{size}x{size} need {need / 2**30:.1f} GiB "
                        f"of memory, more than this machine's {have / 2**30:.0f} GiB; lower data.image_size or "
                        "data.limit")
