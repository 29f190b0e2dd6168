"""Captions of an image folder: `metadata.jsonl` lines (Hugging Face imagefolder) or sidecar `.txt` files."""

from __future__ import annotations

import codecs
import json
import logging
import os
import posixpath
from pathlib import Path

from latentdiff.errors import UserError
from latentdiff.formats.paths import check_regular_file

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder: one {"file_name": ..., "text": ...} per line


def read_text(path: Path) -> str:
    """A caption file as text: UTF-8 with an optional BOM; invalid bytes name their offset."""
    check_regular_file(path, "caption file")  # a FIFO would block the read forever
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read caption file ({e.strerror or e})") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        off = bom + e.start
        line = data.count(b"\n", 0, off) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 at byte offset {off} ({e.reason}); save it as UTF-8") from None


def read_captions(root: Path, files: list[str], column: str) -> tuple[dict[str, str], str]:
    """Caption per image from metadata.jsonl files, else from a sidecar .txt; plus a hint for errors."""
    metas, txts = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]  # as folders.list_images
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            rel = posixpath.normpath(posixpath.join(rel_dir, f))
            if f == METADATA_FILE:
                metas.append(rel)
            elif f.endswith(".txt") and not f.startswith((".", "__")):
                txts.add(rel)
            elif f == "metadata.csv":
                log.warning("%s: metadata.csv is not read; write the captions to %s", root / rel, METADATA_FILE)
    images = set(files)
    captions: dict[str, str] = {}
    named: dict[str, str] = {}  # image -> "metadata.jsonl:line" that named it, to report duplicates
    absent: list[str] = []
    keys: set[str] = set()
    for meta in sorted(metas):
        path, base = root / meta, posixpath.dirname(meta)
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 or U+0085.
        for n, line in enumerate(read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
                raise UserError(f"{path}:{n}: expected a JSON object with a 'file_name' string, got {line[:80]!r}")
            keys.update(row)
            # file_name is relative to the metadata file's folder (imagefolder's rule).
            rel = posixpath.normpath(posixpath.join(base, row["file_name"]))
            if rel not in images:
                absent.append(f"{meta}:{n} {row['file_name']!r}")
                continue
            if rel in named:
                raise UserError(f"{root / rel}: named twice, at {named[rel]} and {meta}:{n}; keep one line")
            named[rel] = f"{meta}:{n}"
            text = row.get(column)
            if text is not None and not isinstance(text, str):
                got = f"{type(text).__name__} {str(text)[:40]!r}"
                raise UserError(f"{path}:{n}: {column!r} must be a string, got {got}")
            if text and text.strip():  # blank captions count as missing
                captions[rel] = text.strip()
    if absent:
        more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
        raise UserError(f"{root}: {len(absent)} metadata line(s) name files that are not images in the folder: "
                        f"{', '.join(absent[:5])}{more}")
    for rel in files:
        txt = posixpath.splitext(rel)[0] + ".txt"
        if rel not in captions and txt in txts:
            text = read_text(root / txt).strip()
            if text:
                captions[rel] = text
    hint = ""
    if metas and column not in keys:
        hint = f"; {metas[0]} has no {column!r} key (keys: {', '.join(sorted(keys))}): set data.caption_column"
    return captions, hint


def use_captions(where: Path | str, mode: str, total: int, lacking: list[str], hint: str = "",
                 n_lacking: int | None = None) -> bool:
    """Whether ``total`` images train with captions under data.captions ``mode``: 'ignore' never, 'auto' when
    any has one, 'require' always; a UserError naming ``lacking`` (the images without, or the first of
    ``n_lacking``) when some but not all do."""
    if mode == "ignore":
        return False
    n_lacking = len(lacking) if n_lacking is None else n_lacking
    use = mode == "require" or n_lacking < total
    if use and n_lacking:
        # Checked over the whole set, before decoding: both splits agree and errors come early.
        why = ("data.captions='require'" if mode == "require"
               else f"data.captions='auto' needs all or none, and {total - n_lacking} have one")
        more = f" (and {n_lacking - 5} more)" if n_lacking > 5 else ""
        raise UserError(f"{where}: {n_lacking} of {total} images have no caption ({why}): "
                        f"{', '.join(lacking[:5])}{more}; add metadata.jsonl lines or .txt files, "
                        f"or set data.captions=ignore{hint}")
    return use
