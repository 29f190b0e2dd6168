"""What every data source hands to `load_dataset`, and the rules all sources share (split, memory)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from latentdiff.data.config import DataConfig
from latentdiff.errors import UserError


@dataclass
class SourceImages:
    """One source's images as uint8 N x C x H x W, with whatever labels, files and captions it has."""

    images: torch.Tensor
    labels: torch.Tensor | None = None  # int64 class indices into class_names
    class_names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # folder sources: relative path of each image
    captions: list[str] | None = None  # one caption per image


def fingerprint_settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that shape a data set's pixels and labels, for its fingerprint.

    Moving a folder, pointing fashion_mnist_dir elsewhere, toggling hflip / on_bad_file, or how images are
    read (stream, workers) keeps the fingerprint, and so any cache or resume keyed on it. The caption settings
    act through the captions themselves, which the fingerprints hash.
    """
    settings = cfg.to_dict()
    for key in ("fashion_mnist_dir", "hflip", "on_bad_file", "captions", "caption_column", "emoji_font", "stream",
                "workers"):
        settings.pop(key)
    if cfg.source != "shapes":  # shapes-only settings: other sources' fingerprints stay as they were
        for key in ("shapes_count", "two_object_fraction"):
            settings.pop(key)
    if cfg.buckets is None:  # unbucketed fingerprints stay as they were before buckets existed
        for key in ("buckets", "bucket_step"):
            settings.pop(key)
    if not cfg.is_embedded:
        settings["source"] = "folder"
    return settings


def in_test(key: str) -> bool:
    """Deterministic held-out 10%: a fixed hash of the key, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10 == 0


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes the device can hold at most: a GPU's memory, else this machine's RAM; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":  # mps shares the machine's memory, but torch does not say how much it may use
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): the allocator decides
        return None


def memory_needed(need: int, device: torch.device | str = "cpu") -> str:
    """"" when ``need`` bytes fit on ``device``; else "at least X GiB of memory, more than this machine's Y GiB"."""
    have = available_memory(device)
    if have is None or need <= have:
        return ""
    where = "this machine's" if torch.device(device).type == "cpu" else f"{device}'s"
    return f"at least {need / 2**30:.1f} GiB of memory, more than {where} {have / 2**30:.0f} GiB"


def check_memory(n: int, channels: int, size: int) -> None:
    """Refuse a data set that cannot fit in memory before allocating it (numpy would fail with a traceback)."""
    problem = memory_needed(n * channels * size * size)
    if problem:
        raise UserError(f"data.image_size={size}: {n} images of {channels}x{size}x{size} need {problem}; lower "
                        "data.image_size or data.limit")
