"""Training state on disk: one folder per checkpoint, swapped in atomically, with a ``latest.json`` pointer.

A checkpoint folder is written under a temporary name, every file fsynced, then renamed; only then
does ``latest.json`` (itself written atomically) point at it. A kill at any moment leaves the
previous checkpoint and pointer intact.

What a training run puts in one: each network's weights, each optimiser's state (flattened to tensors
plus JSON), the random streams (data order, objective noise, every rank's dropout) and the counters,
so that ``--resume`` continues exactly (`save_training_state` / `load_training_state`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import (flatten_optimizer, fsync_dir, is_temp_file, load_into, load_json_as,
                                           load_json_object, load_tensors, save_json, save_tensors,
                                           unflatten_optimizer)
from latentdiff.formats.dataclass_io import build_dataclass

POINTER = "latest.json"
TEMP_PREFIX = ".tmp-"  # a checkpoint folder while it is written


@dataclass(frozen=True)
class Pointer:
    """``latest.json``: which checkpoint folder is the latest."""

    checkpoint: str
    step: int


@dataclass(frozen=True)
class LogWindowState:
    """The logs since the last metrics.csv row (metrics_log.LogWindow), as a checkpoint holds them."""

    first_step: int
    names: tuple[str, ...] = ()  # in the order the columns were made (JSON sorts a mapping's keys)
    sums: tuple[float, ...] = ()
    count: int = 0
    bad: int = 0  # non-finite steps among them
    counted: int = 0  # of those, already in the run's bad_steps


@dataclass(frozen=True)
class CheckpointState:
    """``state.json`` as read back: the types a resume relies on (keys added later are kept, not checked)."""

    step: int
    optimizers: dict[str, Any] = field(default_factory=dict)  # per optimiser: its JSON-safe param groups
    bad_steps: int = 0
    images_seen: int = 0
    data_fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the trainer's own state (TrainingRun.extra_state)
    world_size: int = 1
    grad_scaler: Optional[dict[str, Any]] = None
    log_window: Optional[LogWindowState] = None  # the logs behind metrics.csv's next row


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
    path = root / POINTER
    if not os.path.lexists(path):
        return None
    name = load_json_as(path, Pointer).checkpoint
    if name != Path(name).name or not name.startswith("step_"):
        raise UserError(f"{path}: checkpoint: expected a folder name step_XXXXXXXX, got {name!r}")
    return name


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
    """Read the tensor groups and ``state.json`` of one checkpoint folder (its types checked: CheckpointState)."""
    path = folder / "state.json"
    state = load_json_object(path)
    build_dataclass(CheckpointState, state, f"{path}:", float_strings=False, other_keys=True)  # types checked
    return {g: load_tensors(folder / f"{g}.safetensors") for g in groups}, state


# ---- a training run's state ------------------------------------------------------------------------------
def save_training_state(root: Path, step: int, modules: dict[str, nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], rng: dict[str, torch.Tensor],
                        state: dict[str, Any], keep: int) -> Path:
    """Checkpoint ``modules``' weights, ``optimizers``' state, the ``rng`` tensors (`rng_tensors`), JSON ``state``."""
    groups: dict[str, dict[str, torch.Tensor]] = {k: m.state_dict() for k, m in modules.items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        groups[f"opt_{name}"], opt_meta[name] = flatten_optimizer(opt.state_dict())
    groups["rng"] = rng
    return save_checkpoint(root, step, groups, {"optimizers": opt_meta, **state}, keep)


def load_training_state(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what `save_training_state` wrote into ``modules`` and ``optimizers``; return its rng tensors and state.

    Refuses a checkpoint written for other data (its ``data_fingerprint`` differs from ``fingerprint``).
    """
    names = list(modules) + [f"opt_{k}" for k in optimizers] + ["rng"]
    groups, state = load_checkpoint(folder, names)
    if state.get("data_fingerprint") != fingerprint:
        raise UserError(f"{folder}: the data set changed since this checkpoint was written "
                        "(fingerprint differs); start a new run with another --out")
    for name, module in modules.items():
        load_into(module, groups[name], str(folder / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        meta, where = state["optimizers"].get(name), f"{folder / 'state.json'}: optimizers.{name}"
        if not isinstance(meta, dict):
            raise UserError(f"{where}: expected a mapping with param_groups, got {meta!r:.60}")
        try:
            opt.load_state_dict(unflatten_optimizer(groups[f"opt_{name}"], meta))
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise UserError(f"{where}: does not fit this run's optimiser ({type(e).__name__}: {e})") from None
    streams = ("batches.perm", "batches.pos", "batches.generator", "noise", "torch")
    missing = [k for k in streams if k not in groups["rng"]]
    if missing:
        raise UserError(f"{folder / 'rng.safetensors'}: missing the random stream(s) {', '.join(missing)}")
    return groups["rng"], state


def rng_tensors(batches: dict[str, torch.Tensor], noise: torch.Tensor,
                torch_states: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The random streams as one tensor group: data order (``batches``), objective noise, each rank's torch RNG."""
    rng = {f"batches.{k}": v for k, v in batches.items()} | {"noise": noise, "torch": torch_states[0]}
    return rng | {f"torch.rank{r}": s for r, s in enumerate(torch_states) if r}


def split_rng_tensors(rng: dict[str, torch.Tensor],
                      rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """`rng_tensors` undone for one rank: data order, objective noise, and its torch RNG (None: not saved)."""
    own = "torch" if rank == 0 else f"torch.rank{rank}"
    return {k[len("batches."):]: v for k, v in rng.items() if k.startswith("batches.")}, rng["noise"], rng.get(own)
