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
from latentdiff.formats.checkpoint import fsync_dir, is_temp_file, load_json, load_tensors, save_json, save_tensors

POINTER = "latest.json"
TEMP_PREFIX = ".tmp-"  # a checkpoint folder while it is written


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    keep: int) -> Path:
    """Write ``root/step_XXXXXXXX/{name}.safetensors`` for each group plus ``state.json``; prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp, final = root / f"{TEMP_PREFIX}{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and _pointed_at(root) == name:
        # Saving the step the run resumed from (nothing trained since, e.g. a resume after the last step):
        # that checkpoint already holds this state, and deleting it first would open a window in which
        # a kill leaves latest.json pointing at nothing.
        return final
    for group, group_tensors in tensors.items():
        save_tensors(group_tensors, tmp / f"{group}.safetensors")
    save_json({"step": step, **state}, tmp / "state.json")
    if final.exists():  # written by a run killed before it moved latest.json here: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    save_json({"checkpoint": name, "step": step}, root / POINTER)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pointed_at(root: Path) -> str | None:
    return load_json(root / POINTER)["checkpoint"] if (root / POINTER).is_file() else None


def remove_interrupted_writes(run_dir: Path) -> list[Path]:
    """Delete what killed processes left half-written in a run folder (temporary files and checkpoint
    folders, never a finished file); returns what was removed. Only for folders no other process writes."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.rglob(".*") if is_temp_file(p) or (p.is_dir() and p.name.startswith(TEMP_PREFIX))]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest.json`` points at, or None when there is no checkpoint yet."""
    name = _pointed_at(root)
    if name is None:
        return None
    folder = root / name
    if not (folder / "state.json").is_file():
        raise UserError(f"{root / POINTER} points at {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: Path, groups: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read the tensor groups and ``state.json`` of one checkpoint folder."""
    return {g: load_tensors(folder / f"{g}.safetensors") for g in groups}, load_json(folder / "state.json")
