"""What a streamed source knows of each image before decoding it, kept in a few numpy arrays.

Arrays, not lists of Python objects: 200 000 captions as Python strings take ~20 MB and are copied page by page
into every DataLoader worker as their reference counts change; as one byte blob they take their UTF-8 length.
Columns a data set does not need (labels of an unlabelled set, pixel sizes without buckets) are None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterable, Iterator

import numpy as np


class TextColumn:
    """A read-only list of strings stored as one UTF-8 blob and the end offset of each string."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray) -> None:
        self.blob, self.ends = np.ascontiguousarray(blob, np.uint8), np.ascontiguousarray(ends, np.int64)

    @classmethod
    def of(cls, texts: Iterable[str]) -> "TextColumn":
        """Pack strings into a column."""
        encoded = [t.encode("utf-8") for t in texts]
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
        return cls(np.frombuffer(b"".join(encoded), np.uint8), ends)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if i < 0:
            i += len(self)
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start: int(self.ends[i])].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Bytes of each string (0: empty)."""
        return np.diff(self.ends, prepend=np.int64(0))

    def take(self, rows: np.ndarray) -> "TextColumn":
        """The strings at ``rows``, in that order."""
        lengths = self.lengths()[rows]
        starts = self.ends[rows] - lengths
        pieces = [self.blob[s: s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        blob = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        return TextColumn(blob, np.cumsum(lengths, dtype=np.int64))


TEXT = ("names", "captions")


@dataclass
class SampleIndex:
    """Per image: where its bytes are and what is known without decoding them (one row per image)."""

    names: TextColumn  # relative path (folders; shards: the packed file_name, else the sample key)
    shard: np.ndarray  # int32: which file of the source's list holds the bytes (folders: the image itself)
    offset: np.ndarray  # int64: byte offset of the image in that file
    nbytes: np.ndarray  # int64: length of the image's bytes
    width: np.ndarray | None = None  # int32: pixels after EXIF rotation, 0 unknown; None when not kept
    height: np.ndarray | None = None  # int32
    label: np.ndarray | None = None  # int64: class index, -1 for none; None: no labels
    captions: TextColumn | None = None  # "" for none; None: no captions
    stamp: np.ndarray | None = None  # int64: modification time in ns (folders; shards: their manifest's hash)

    def __len__(self) -> int:
        return len(self.offset)

    def take(self, rows: np.ndarray) -> "SampleIndex":
        """The images at ``rows``, in that order."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return SampleIndex(**{k: None if v is None else v.take(rows) if isinstance(v, TextColumn) else v[rows]
                              for k, v in out.items()})

    def without(self, *columns: str) -> "SampleIndex":
        """This index with ``columns`` dropped (set to None)."""
        return replace(self, **{c: None for c in columns})

    def with_shard(self, shard: int) -> "SampleIndex":
        """This index with every image in file number ``shard``."""
        return replace(self, shard=np.full(len(self), shard, np.int32))

    def digest_arrays(self) -> list[np.ndarray]:
        """The arrays that identify these images (for a fingerprint)."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            out += [] if v is None else [v.blob, v.ends] if isinstance(v, TextColumn) else [v]
        return out

    @staticmethod
    def gather(parts: Iterable[tuple["SampleIndex", np.ndarray]], n: int, text_bytes: dict[str, int]) -> "SampleIndex":
        """One index of rows ``rows`` of each (part, rows), written straight into arrays of the final size (``n``
        rows, ``text_bytes`` bytes per text column), so that at no time two copies of the index are in memory.
        The parts must agree on which columns they have."""
        out: dict[str, object] = {}
        pos, text_pos = 0, dict.fromkeys(TEXT, 0)
        for part, rows in parts:
            part = part.take(rows)
            for f in fields(SampleIndex):
                v = getattr(part, f.name)
                if v is None:
                    out.setdefault(f.name, None)
                    continue
                if isinstance(v, TextColumn):
                    if f.name not in out:
                        out[f.name] = TextColumn(np.empty(text_bytes[f.name], np.uint8), np.empty(n, np.int64))
                    col, start = out[f.name], text_pos[f.name]
                    col.blob[start: start + len(v.blob)] = v.blob
                    col.ends[pos: pos + len(part)] = v.ends + start
                    text_pos[f.name] += len(v.blob)
                else:
                    if f.name not in out:
                        out[f.name] = np.empty(n, v.dtype)
                    out[f.name][pos: pos + len(part)] = v
            pos += len(part)
        assert pos == n, (pos, n)
        return SampleIndex(**out)
