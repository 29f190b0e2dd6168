"""Training state on disk: one folder per checkpoint, swapped in atomically, with a ``latest.json`` pointer.

A checkpoint folder is written under a temporary name, every file fsynced, then renamed; only then
does ``latest.json`` (itself written atomically) point at it. A kill at any moment leaves the
previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import fsync_dir, load_json, load_tensors, save_json, save_tensors

POINTER = "latest.json"


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    keep: int) -> Path:
    """Write ``root/step_XXXXXXXX/{name}.safetensors`` for each group plus ``state.json``; prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    for group, group_tensors in tensors.items():
        save_tensors(group_tensors, tmp / f"{group}.safetensors")
    save_json({"step": step, **state}, tmp / "state.json")
    if final.exists():  # re-saving the same step (e.g. at the end of a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    save_json({"checkpoint": name, "step": step}, root / POINTER)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest.json`` points at, or None when there is no checkpoint yet."""
    if not (root / POINTER).is_file():
        return None
    folder = root / load_json(root / POINTER)["checkpoint"]
    if not (folder / "state.json").is_file():
        raise UserError(f"{root / POINTER} points at {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: Path, groups: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read the tensor groups and ``state.json`` of one checkpoint folder."""
    return {g: load_tensors(folder / f"{g}.safetensors") for g in groups}, load_json(folder / "state.json")
