"""A folder of WebDataset shards as a data source: which shards, their indexes, and what is wrong with them.

With the ``shards.json`` that ``latentdiff data pack`` writes, the manifest names the shards: one that is
missing is an error (deleted between runs?), one shorter than packed was truncated and loses the samples
past the cut (counted). Without it, every ``*.tar`` in the folder is a shard (any WebDataset set).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from latentdiff.data.pack import FORMAT, MANIFEST
from latentdiff.data.sample_index import SampleIndex
from latentdiff.data.tar_shards import index_matches, read_index, scan_shard
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json


def is_shard_set(path: Path) -> bool:
    """A folder holding shards.json or .tar files directly (not an image folder)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob("*.tar")))


class ShardSet:
    """The shards of a folder, checked: ``parts()`` reads their indexes one at a time (shard order, both splits)."""

    def __init__(self, root: Path, caption_column: str) -> None:
        manifest = load_json(root / MANIFEST) if (root / MANIFEST).is_file() else None
        if manifest is not None:
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise UserError(f"{root / MANIFEST}: not a manifest of `latentdiff data pack` (format {FORMAT})")
            records = manifest["shards"]
            missing = [r["name"] for r in records if not (root / r["name"]).is_file()]
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise UserError(f"{root / missing[0]}: listed in {MANIFEST} but missing{more}; restore "
                                f"{'it' if len(missing) == 1 else 'them'} or pack the folder again")
        else:
            records = [{"name": p.name} for p in sorted(root.glob("*.tar"))]
        if not records:
            raise UserError(f"{root}: no shards (.tar files) in this folder")
        self.paths = [root / r["name"] for r in records]
        self.class_names: list[str] = list(manifest["class_names"]) if manifest is not None else []
        self.problems: list[str] = []  # one line per sample left out
        self.lost = 0  # samples left out (may exceed len(problems): a truncation loses many at once)
        self._scanned: dict[int, SampleIndex] = {}  # shards without a matching index, read from their tars
        h = hashlib.sha256()
        for k, (rec, path) in enumerate(zip(records, self.paths)):
            size = path.stat().st_size
            if not index_matches(path, size):  # none, or written for another version of this tar
                index, found = scan_shard(path, caption_column)
                self._scanned[k] = index
                self.problems += found
                self.lost += max(len(found), rec.get("samples", 0) - len(index))
            h.update(json.dumps([rec["name"], rec.get("sha256") if rec.get("bytes") == size else size]).encode())
        self.identity = h.hexdigest()  # the shards' names and packed hashes (or sizes): part of the fingerprint

    def parts(self) -> Iterator[SampleIndex]:
        """Each shard's index (``shard`` set to its number), read when reached."""
        for k, path in enumerate(self.paths):
            yield (self._scanned[k] if k in self._scanned else read_index(path)).with_shard(k)
