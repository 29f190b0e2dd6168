"""What a streamed source knows of each image before decoding it, kept in a few numpy arrays.

Arrays, not lists of Python objects: 200 000 captions as Python strings take ~20 MB and are copied page by page
into every DataLoader worker as their reference counts change; as one byte blob they take their UTF-8 length.
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

    def take(self, rows: np.ndarray) -> "TextColumn":
        """The strings at ``rows``, in that order."""
        starts = np.concatenate([[0], self.ends[:-1]])[rows] if len(self) else np.zeros(0, np.int64)
        lengths = self.ends[rows] - starts
        pieces = [self.blob[s: s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        blob = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        return TextColumn(blob, np.cumsum(lengths, dtype=np.int64))

    @staticmethod
    def concat(columns: list["TextColumn"]) -> "TextColumn":
        """One column holding the strings of ``columns`` one after another."""
        offsets = np.cumsum([0] + [len(c.blob) for c in columns[:-1]], dtype=np.int64)
        blob = np.concatenate([c.blob for c in columns]) if columns else np.zeros(0, np.uint8)
        ends = np.concatenate([c.ends + o for c, o in zip(columns, offsets)]) if columns else np.zeros(0, np.int64)
        return TextColumn(blob, ends)


@dataclass
class SampleIndex:
    """Per image: where its bytes are and what is known without decoding them (one row per image)."""

    names: TextColumn  # relative path (folders; shards: the packed file_name, else the sample key)
    shard: np.ndarray  # int32: which file of the source's list holds the bytes (folders: the image itself)
    offset: np.ndarray  # int64: byte offset of the image in that file
    nbytes: np.ndarray  # int64: length of the image's bytes
    width: np.ndarray  # int32: pixels after EXIF rotation; 0 when not read yet (only buckets need it)
    height: np.ndarray  # int32
    label: np.ndarray  # int64: class index, -1 for none
    captions: TextColumn  # "" for none
    stamp: np.ndarray  # int64: modification time in ns (folders) or 0 (shards: their manifest is the identity)

    def __len__(self) -> int:
        return len(self.offset)

    def take(self, rows: np.ndarray) -> "SampleIndex":
        """The images at ``rows``, in that order."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return SampleIndex(**{k: v.take(rows) if isinstance(v, TextColumn) else v[rows] for k, v in out.items()})

    @staticmethod
    def concat(parts: list["SampleIndex"]) -> "SampleIndex":
        """One index of the images of ``parts`` one after another."""
        out = {}
        for f in fields(SampleIndex):
            values = [getattr(p, f.name) for p in parts]
            out[f.name] = TextColumn.concat(values) if f.name in ("names", "captions") else np.concatenate(values)
        return SampleIndex(**out)

    def with_shard(self, shard: int) -> "SampleIndex":
        """This index with every image in file number ``shard``."""
        return replace(self, shard=np.full(len(self), shard, np.int32))

    def digest_arrays(self) -> list[np.ndarray]:
        """The arrays that identify these images (for a fingerprint)."""
        return [self.names.blob, self.names.ends, self.shard, self.offset, self.nbytes, self.width, self.height,
                self.label, self.captions.blob, self.captions.ends, self.stamp]
