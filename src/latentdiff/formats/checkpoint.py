"""Safetensors and JSON files, written atomically, read with errors that name the file and keys.

Atomic means: write to a temporary name in the same folder, fsync, rename over the target, fsync the
folder. A kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import build_dataclass
from latentdiff.formats.paths import CannotWrite, check_regular_file


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files are named ".NAME.XXXXXXXX.tmp" beside their target
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))  # XXXXXXXX: mkstemp's random part


def atomic_write(path: Path | str, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the finished, fsynced file onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:  # a full disk, a read-only folder: one line naming the file, not a traceback
        raise CannotWrite(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared like any other file
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CannotWrite(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def is_temp_file(path: Path) -> bool:
    """True for a temporary file of :func:`atomic_write` (left behind only when a process was killed)."""
    return TEMP_NAME.fullmatch(path.name) is not None and path.is_file()


def save_json(obj: Any, path: Path | str) -> None:
    """Write JSON atomically (sorted keys, indented, UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8"))


def load_json(path: Path | str) -> Any:
    """Read JSON; a missing or malformed file is a UserError naming it."""
    path = check_regular_file(path)  # a FIFO would block the read forever
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def metadata_json_object(metadata: dict[str, str] | None, key: str, where: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors file's metadata ({} when absent); bad JSON or a
    value that is not an object is a UserError naming ``where`` and the key."""
    text = (metadata or {}).get(key)
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: metadata entry {key!r} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise UserError(f"{where}: metadata entry {key!r} must be a JSON object")
    return out


def load_json_object(path: Path | str) -> dict[str, Any]:
    """Read a JSON file that must hold an object (settings by name); anything else is a UserError naming it."""
    obj = load_json(path)
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), "a number")
        raise UserError(f"{path}: expected a JSON object of settings, got "
                        f"{'null' if obj is None else f'{kind} {json.dumps(obj)[:60]}'}")
    return obj


def load_json_as(path: Path | str, cls: type, other_keys: bool = False) -> Any:
    """A JSON object file read into the dataclass ``cls``: the one typed reader of the files we read back.

    A wrong type, null, a list or a string where a number belongs, a missing or (unless ``other_keys``,
    for files other programs write) unknown key is a one-line UserError naming the file and the key.
    """
    return build_dataclass(cls, load_json_object(path), f"{path}:", float_strings=False, other_keys=other_keys)


@contextlib.contextmanager
def naming_file(path: Path | str) -> Iterator[None]:
    """Errors raised inside (building a model from a file's settings) name ``path`` if they do not yet."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous and moved to the CPU)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; missing, truncated or corrupt files are a UserError naming the file."""
    path = check_regular_file(path, "safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights_only(path: Path | str) -> Any:
    """A PyTorch pickle (.ckpt/.pt/.pth/.bin) read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so the file can never run code; refused or unreadable files are a UserError naming it."""
    path = check_regular_file(path, "weights file")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing; one line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: it holds objects other than tensors and plain data, and loading it "
                        f"would run code from the file (read with weights_only=True: {_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, ImportError,
            zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable PyTorch weights file (truncated or corrupt?): "
                        f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``module``; any missing, unexpected or mis-shaped key is a UserError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) e.g. {'; '.join(shapes[:3])}")
    if problems:
        raise UserError(f"{source} does not match its config: {'; '.join(problems)}")
    module.load_state_dict(tensors)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-safe param groups."""
    tensors = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
