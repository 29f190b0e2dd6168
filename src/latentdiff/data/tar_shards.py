"""WebDataset tar shards: write them, index them, read one image's bytes by offset.

A WebDataset shard is a plain tar in which the files of one sample share a key and sit next to each other:
``000000042.png``, ``000000042.txt`` (caption), ``000000042.cls`` (class index), ``000000042.json``. Any tool
that reads WebDataset (webdataset, wids, img2dataset's outputs) reads ours and we read theirs.

Training draws images in a seeded random order (training/loop.py, Batches), so it reads them by offset, not
front to back: beside each shard ``NAME.tar`` an index ``NAME.tar.idx`` (safetensors, written by the packer)
gives every sample's image offset, size, pixel size, label and caption. A shard without one is indexed by
reading its tar headers (Python's tarfile) at start-up. Writes are atomic: a shard appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdiff.data.sample_index import SampleIndex, TextColumn
from latentdiff.formats.checkpoint import TEMP_SUFFIX, fsync_dir, load_tensors, save_tensors

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")
INDEX_SUFFIX = ".idx"  # NAME.tar.idx beside NAME.tar
SIDE_MAX_BYTES = 1 << 20  # .txt / .json / .cls members larger than this are not read while indexing
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the first dot of the name


class ShardWriter:
    """Writes samples into numbered shards ``000000.tar``, ... of at most ``max_count`` samples (and about
    ``max_bytes`` bytes), each with its index, each moved into place only when complete."""

    def __init__(self, out: Path, max_count: int, max_bytes: int | None = None) -> None:
        self.out, self.max_count, self.max_bytes = Path(out), max_count, max_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []  # one per finished shard: name, samples, bytes, sha256
        self.written = 0  # samples so far
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict[str, Any]] = []

    def write(self, key: str, image: bytes, ext: str, name: str, width: int, height: int,
              caption: str | None = None, label: int | None = None) -> None:
        """Add one sample: the image file's bytes unchanged, its caption, label and a JSON with its origin."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        meta = json.dumps({"file_name": name, "width": width, "height": height}, ensure_ascii=False).encode()
        members = [(f"{key}.{ext}", image), (f"{key}.json", meta)]
        if caption is not None:
            members.append((f"{key}.txt", caption.encode("utf-8")))
        if label is not None:
            members.append((f"{key}.cls", str(label).encode()))
        offset = 0
        for i, (member, data) in enumerate(members):
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # no clock or owner: same input, same bytes
            self._tar.addfile(info, io.BytesIO(data))
            if i == 0:  # the data sits just before the padding that ends the member
                offset = self._tar.offset - _blocks(len(data))
        self.written += 1
        self._rows.append({"name": name, "offset": offset, "nbytes": len(image), "width": width, "height": height,
                           "label": -1 if label is None else label, "caption": caption or ""})
        if len(self._rows) >= self.max_count or (self.max_bytes and self._tar.offset >= self.max_bytes):
            self._finish()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; the records of all shards written."""
        if self._tar is not None:
            self._finish()
        return self.records

    def _open(self) -> None:
        self._name = f"{len(self.records):06d}.tar"
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._name}.", suffix=TEMP_SUFFIX, dir=self.out)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)
        path = self.out / self._name
        index = index_from_rows(self._rows)
        size = os.path.getsize(self._tmp)
        write_index(index, path, size)  # the index first: a shard is never found without it
        os.replace(self._tmp, path)
        fsync_dir(self.out)
        self.records.append({"name": self._name, "samples": len(self._rows), "bytes": size,
                             "sha256": file_sha256(path)})
        self._tar, self._rows = None, []


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _blocks(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def index_from_rows(rows: list[dict[str, Any]]) -> SampleIndex:
    """A shard's index from one dict per sample (name, offset, nbytes, width, height, label, caption)."""
    def col(key: str, dtype: Any) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=dtype)

    return SampleIndex(TextColumn.of(r["name"] for r in rows), np.zeros(len(rows), np.int32), col("offset", np.int64),
                       col("nbytes", np.int64), col("width", np.int32), col("height", np.int32), col("label", np.int64),
                       TextColumn.of(r["caption"] for r in rows))


def write_index(index: SampleIndex, shard: Path, tar_bytes: int) -> None:
    """Save a shard's index beside it (``NAME.tar.idx``), stamped with the size of the tar it describes."""
    arrays = {"names": index.names.blob, "name_ends": index.names.ends, "offset": index.offset,
              "nbytes": index.nbytes, "width": index.width, "height": index.height, "label": index.label,
              "captions": index.captions.blob, "caption_ends": index.captions.ends}
    save_tensors({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                 shard.with_name(shard.name + INDEX_SUFFIX), {"tar_bytes": str(tar_bytes)})


def index_matches(shard: Path, tar_bytes: int) -> bool:
    """Whether ``shard`` has an index beside it that describes a tar of its size (reads the header only)."""
    path = shard.with_name(shard.name + INDEX_SUFFIX)
    if not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get("tar_bytes") == str(tar_bytes)
    except (SafetensorError, OSError):
        return False  # unreadable: the tar is indexed again


def read_index(shard: Path) -> SampleIndex:
    """The index saved beside ``shard`` (check :func:`index_matches` first)."""
    a = {k: v.numpy() for k, v in load_tensors(shard.with_name(shard.name + INDEX_SUFFIX)).items()}
    return SampleIndex(TextColumn(a["names"], a["name_ends"]), np.zeros(len(a["offset"]), np.int32), a["offset"],
                       a["nbytes"], a["width"], a["height"], a["label"], TextColumn(a["captions"], a["caption_ends"]))


def scan_shard(path: Path, caption_column: str) -> tuple[SampleIndex, list[str]]:
    """Index a shard by reading its tar headers and small text members; also the problems found, one line each
    (a truncated tar, a sample without an image, a bad .cls): those samples are left out."""
    size = path.stat().st_size
    groups: list[tuple[str, list[tuple[str, tarfile.TarInfo]]]] = []  # (key, [(ext, member)]) in tar order
    problems: list[str] = []
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            return index_from_rows([]), [f"{path.name}: not a tar file ({e})"]
        end, whole = 0, True
        try:
            for m in tar:
                got = _KEY.match(m.name) if m.isfile() else None
                if got is None:
                    continue
                if not groups or groups[-1][0] != got[1]:
                    groups.append((got[1], []))
                groups[-1][1].append((got[2].lower(), m))
                end = m.offset_data + m.size
        except (tarfile.TarError, EOFError, OSError) as e:
            problems.append(f"{path.name}: unreadable after byte {end} ({e}); samples past it are lost")
            whole = False
        f.seek(_blocks(end))
        if whole and (end > size or f.read(1024) != bytes(1024)):  # a complete tar ends with two zero blocks
            problems.append(f"{path.name}: truncated at byte {size}; samples past it are lost")
            whole = False
        if not whole and groups:  # the last sample may lack members that were cut off
            problems.append(f"{path.name}: sample {groups[-1][0]!r} is cut off (the tar is truncated)")
            groups.pop()
        rows: list[dict[str, Any]] = []
        for key, group in groups:
            _add_sample(f, key, group, caption_column, size, rows, problems, path.name)
    return index_from_rows(rows), problems


def _add_sample(f: Any, key: str | None, group: list[tuple[str, tarfile.TarInfo]], caption_column: str, size: int,
                rows: list[dict[str, Any]], problems: list[str], shard: str) -> None:
    """Turn the members of one sample into an index row, or a problem line."""
    images = [m for ext, m in group if ext.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if not images:
        problems.append(f"{shard}: sample {key!r} has no image ({', '.join(m.name for _, m in group)})")
        return
    if any(m.offset_data + m.size > size for _, m in group):
        problems.append(f"{shard}: sample {key!r} is cut off (the tar is truncated)")
        return
    side = {ext: _read(f, m) for ext, m in group if ext in ("txt", "json", "cls") and m.size <= SIDE_MAX_BYTES}
    meta: dict[str, Any] = {}
    if "json" in side:
        try:
            meta = json.loads(side["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    caption = meta.get(caption_column) if isinstance(meta.get(caption_column), str) else None
    if not (caption and caption.strip()) and "txt" in side:
        caption = side["txt"].decode("utf-8", errors="replace")
    label = -1
    if "cls" in side:
        try:
            label = int(side["cls"].decode().strip())
        except ValueError:
            problems.append(f"{shard}: {key}.cls holds {side['cls'][:20]!r}, not a class index")
            return
    name = meta.get("file_name") if isinstance(meta.get("file_name"), str) else None
    dims = [meta.get(k) for k in ("width", "height")]
    w, h = dims if all(isinstance(d, int) and d > 0 for d in dims) else (0, 0)
    rows.append({"name": name or key, "offset": images[0].offset_data, "nbytes": images[0].size, "width": w,
                 "height": h, "label": label, "caption": (caption or "").strip()})


def _read(f: Any, m: tarfile.TarInfo) -> bytes:
    f.seek(m.offset_data)
    return f.read(m.size)
