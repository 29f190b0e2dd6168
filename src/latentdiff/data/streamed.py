"""Data sets read from disk as batches need them (data.stream): an image folder, or WebDataset shards.

:class:`StreamedImages` answers what trainers ask of ImageData (len, labels, captions, class names,
fingerprint, batch) from a SampleIndex, and decodes an image only when it is drawn, in DataLoader worker
processes during training (data/loader.py). Memory grows by a few dozen bytes of index per image, not by
its pixels. The same decode as the in-memory path (data/decode.py) gives the same pixels, so the same seed
trains the same model from a folder in memory, the folder streamed, or its shards.

An image that fails to decode while training is, with data.on_bad_file=skip, replaced by the next readable
image of its bucket (and that image's label and caption), counted and reported; with "fail" it stops the run
with one line naming it (checkpoints already written stay).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from latentdiff.data.buckets import assign_buckets, parse_buckets
from latentdiff.data.captions import use_captions
from latentdiff.data.config import DataConfig
from latentdiff.data.decode import decode_image, header_size
from latentdiff.data.folders import list_folder
from latentdiff.data.sample_index import SampleIndex, TextColumn
from latentdiff.data.pack import MANIFEST
from latentdiff.data.shard_set import ShardSet, is_shard_set
from latentdiff.data.source import fingerprint_settings, in_test
from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError

log = logging.getLogger(__name__)

MAX_SUBSTITUTES = 64  # a bad image is replaced by one of the next this many of its bucket, else the run stops
HEADER_BYTES = 1 << 18  # enough of a file for PIL to read its size and EXIF orientation


class StreamedImages:
    """A data set whose images stay on disk; ``batch`` and ``rows`` decode the ones asked for."""

    def __init__(self, cfg: DataConfig, folder: Path | None, shards: list[Path], index: SampleIndex,
                 class_names: list[str]) -> None:
        self.cfg, self.source, self.folder, self.shards, self.index = cfg, cfg.source, folder, shards, index
        self.class_names = class_names
        self.labels = torch.from_numpy(index.label) if index.label is not None else None
        self.captions: TextColumn | None = index.captions
        self.sizes: list[tuple[int, int]] = [(cfg.image_size, cfg.image_size)]  # (h, w) of each bucket
        self.bucket: np.ndarray | None = None  # bucket of each image (data.buckets), else None
        self.fingerprint = ""
        self.identity = ""  # shards: their names and packed hashes, hashed (part of the fingerprint)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # for spawned workers: file descriptors do not travel
        return self.__dict__ | {"_fds": {}}

    def size_of(self, i: int) -> tuple[int, int]:
        """(height, width) image ``i`` is decoded to: its bucket's, else data.image_size square."""
        return self.sizes[int(self.bucket[i])] if self.bucket is not None else self.sizes[0]

    def where(self, i: int) -> str:
        """Image ``i`` named for a message: its file, or its shard and name inside."""
        name = self.index.names[i]
        return str(self.folder / name) if self.folder is not None else f"{self.shards[self.index.shard[i]]}: {name!r}"

    def read(self, i: int, limit: int | None = None) -> bytes:
        """The bytes of image ``i``'s file (at most ``limit``); a shard gone missing is a UserError."""
        i = int(i)
        n = int(self.index.nbytes[i]) if limit is None else min(limit, int(self.index.nbytes[i]))
        if self.folder is not None:
            with open(self.folder / self.index.names[i], "rb") as f:
                return f.read(n)
        data = os.pread(self._fd(int(self.index.shard[i])), n, int(self.index.offset[i]))
        if len(data) < n:
            raise OSError(f"the shard ends {n - len(data)} bytes early (truncated since the run started?)")
        return data

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise UserError(f"{self.shards[shard]}: shard missing (deleted since the run started?); "
                                "restore it, or start a new run") from None
        return self._fds[shard]

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (C, H, W) at its size; raises on any defect (as decode_image)."""
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_image(io.BytesIO(self.read(i)), self.size_of(i), self.cfg.channels, self.cfg.center_crop)

    def load(self, i: int) -> tuple[int, np.ndarray, str]:
        """(the image used, its pixels, "" or what was wrong with image ``i``) under data.on_bad_file."""
        try:
            return i, self.decode(i), ""
        except UserError:
            raise
        except Exception as e:  # PIL raises many types on malformed files; all mean "bad file"
            why = f"{self.where(i)}: cannot read image ({type(e).__name__}: {e})"
        if self.cfg.on_bad_file == "fail":
            raise UserError(why)
        for j in self._after(i):
            try:
                return j, self.decode(j), why
            except UserError:
                raise
            except Exception:
                continue
        raise UserError(f"{why}; nor could any of the {MAX_SUBSTITUTES} images after it in its bucket be read")

    def _after(self, i: int) -> list[int]:
        """Up to MAX_SUBSTITUTES images after ``i`` (cyclically) of the same bucket."""
        n, out = len(self), []
        for k in range(1, n):
            j = (i + k) % n
            if self.bucket is None or self.bucket[j] == self.bucket[i]:
                out.append(j)
                if len(out) == MAX_SUBSTITUTES:
                    break
        return out

    def rows(self, idx: Sequence[int]) -> dict[str, Any]:
        """Images ``idx`` decoded: requested and used indices, uint8 pixels, problems; or {"error": line}."""
        try:
            got = [self.load(int(i)) for i in idx]
        except UserError as e:  # handed back as data: a worker's exception would arrive as a traceback
            return {"error": str(e)}
        return {"idx": torch.tensor([int(i) for i in idx], dtype=torch.int64),
                "used": torch.tensor([g[0] for g in got], dtype=torch.int64),
                "pixels": torch.from_numpy(np.stack([g[1] for g in got])), "problems": [g[2] for g in got if g[2]]}

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Float batch in [-1, 1] of images ``idx`` (of one size), decoded here and now."""
        got = self.rows(idx.tolist())
        if "error" in got:
            raise UserError(got["error"])
        return from_uint8_image(got["pixels"])

    def measure(self) -> None:
        """Fill in the width and height of images whose index lacks them, from their headers."""
        todo = np.flatnonzero((self.index.width <= 0) | (self.index.height <= 0))

        def size(i: int) -> tuple[int, int]:
            try:
                return header_size(self.read(i, HEADER_BYTES))
            except Exception:
                try:
                    return header_size(self.read(i))
                except UserError:
                    raise
                except Exception:
                    return 1, 1  # unreadable: any bucket; decoding it will report it
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, (w, h) in zip(todo.tolist(), pool.map(size, todo.tolist())):
                self.index.width[i], self.index.height[i] = w, h


def open_streamed(cfg: DataConfig, min_bucket: int = 1) -> StreamedImages:
    """The images ``cfg`` describes, indexed but not decoded; buckets with fewer than ``min_bucket`` images
    (one batch) merge into their neighbours."""
    root = Path(cfg.source).expanduser()
    if is_shard_set(root):
        data = _open_shards(cfg, root)
    else:
        data = _open_folder(cfg)
    if cfg.buckets is not None:
        data.sizes = parse_buckets(cfg.buckets, cfg.image_size, cfg.bucket_step)
        data.measure()
        data.bucket = assign_buckets(data.index.width, data.index.height, data.sizes, min_bucket)
    data.fingerprint = _fingerprint(data, cfg)
    return data


def _open_shards(cfg: DataConfig, root: Path) -> StreamedImages:
    shards = ShardSet(root, cfg.caption_column)
    if shards.problems or shards.lost:
        first = shards.problems[0] if shards.problems else "samples missing"
        if cfg.on_bad_file == "fail":
            raise UserError(f"{root}: {first} ({shards.lost} sample(s) lost; data.on_bad_file=skip leaves them out)")
        log.warning("%s: left out %d damaged sample(s); first: %s", root, shards.lost, first)
    # Two passes over the shards' indexes, one shard in memory at a time: what the whole set holds (the
    # caption and label rules look at both splits, as for folders) and which rows this split keeps; then
    # those rows, written straight into arrays of the final size.
    total = blank = labelled = kept = 0
    lacking: list[str] = []
    top, rows, text_bytes = -1, [], dict.fromkeys(("names", "captions"), 0)
    for part in shards.parts():
        empty = part.captions.lengths() == 0
        total, blank, labelled = total + len(part), blank + int(empty.sum()), labelled + int((part.label >= 0).sum())
        lacking += [part.names[i] for i in np.flatnonzero(empty)[: 5 - len(lacking)]]
        top = max(top, int(part.label.max(initial=-1)))
        keep = np.flatnonzero([in_test(n) == (cfg.split == "test") for n in part.names])
        keep = keep[: max(0, cfg.limit - kept)] if cfg.limit else keep
        rows.append(keep)
        kept += len(keep)
        text_bytes["names"] += int(part.names.lengths()[keep].sum())
        text_bytes["captions"] += int(part.captions.lengths()[keep].sum())
    if not total:
        raise UserError(f"{root}: no readable samples in {len(shards.paths)} shard(s)")
    captioned = use_captions(root, cfg.captions, total, lacking, n_lacking=blank)
    if 0 < labelled < total:
        raise UserError(f"{root}: {total - labelled} of {total} samples have no .cls class index; label all or none")
    names = shards.class_names or [str(i) for i in range(top + 1)]  # .cls files without names: their numbers
    if top >= len(names):
        raise UserError(f"{root}: a sample's class index {top} is past the {len(names)} classes of {MANIFEST}")
    if not kept:
        raise UserError(f"{root}: the {cfg.split!r} split is empty ({total} images; 'test' holds ~10%)")
    drop = ([] if labelled else ["label"]) + ([] if captioned else ["captions"]) + \
        ([] if cfg.buckets else ["width", "height"])
    index = SampleIndex.gather(((part.without(*drop), keep) for part, keep in zip(shards.parts(), rows)), kept,
                               text_bytes)
    data = StreamedImages(cfg, None, shards.paths, index, names if labelled else [])
    data.identity = shards.identity
    return data


def _open_folder(cfg: DataConfig) -> StreamedImages:
    listing = list_folder(cfg)
    files = listing.files[: cfg.limit]
    stats = [os.stat(listing.root / f) for f in files]
    n = len(files)
    sizes = (np.zeros(n, np.int32), np.zeros(n, np.int32)) if cfg.buckets else (None, None)
    index = SampleIndex(TextColumn.of(files), np.zeros(n, np.int32), np.zeros(n, np.int64),
                        np.array([s.st_size for s in stats], np.int64), *sizes,
                        np.array(listing.labels[:n], np.int64) if listing.labels is not None else None,
                        TextColumn.of(listing.captions[:n]) if listing.captions is not None else None,
                        np.array([s.st_mtime_ns for s in stats], np.int64))
    return StreamedImages(cfg, listing.root, [], index, listing.class_names)


def _fingerprint(data: StreamedImages, cfg: DataConfig) -> str:
    # The files' names, sizes, modification times (folders) or packed hashes (shards), labels, captions and
    # buckets: not the pixels, which would mean reading the whole set at every start.
    head = [fingerprint_settings(cfg), "streamed", data.class_names, len(data), data.identity, data.sizes]
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for a in data.index.digest_arrays() + ([data.bucket.astype(np.int64)] if data.bucket is not None else []):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # no copy of the arrays
    return h.hexdigest()
