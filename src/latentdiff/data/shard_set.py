"""A folder of WebDataset shards as a data source: which shards, their indexes, and what is wrong with them.

With the ``shards.json`` that ``latentdiff data pack`` writes, the manifest names the shards: one that is
missing is an error (deleted between runs?), one shorter than packed was truncated and loses the samples
past the cut (counted). Without it, every ``*.tar`` in the folder is a shard (any WebDataset set).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.data.pack import FORMAT, MANIFEST
from latentdiff.data.sample_index import SampleIndex
from latentdiff.data.tar_shards import read_index, scan_shard
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json


@dataclass
class ShardSet:
    """Every sample of a shard folder, both splits, in shard order (index.shard numbers ``paths``)."""

    paths: list[Path]
    index: SampleIndex
    class_names: list[str]
    identity: str  # sha256 over the shards' names and packed hashes (or sizes): part of the fingerprint
    problems: list[str] = field(default_factory=list)  # one line per sample left out
    lost: int = 0  # samples left out (may exceed len(problems): a truncation loses many at once)


def is_shard_set(path: Path) -> bool:
    """A folder holding shards.json or .tar files directly (not an image folder)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob("*.tar")))


def open_shard_set(root: Path, caption_column: str) -> ShardSet:
    """Index every shard of ``root``: from its ``.idx`` file when it matches the tar, else by reading the tar."""
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
    parts, problems, lost, h = [], [], 0, hashlib.sha256()
    for k, rec in enumerate(records):
        path = root / rec["name"]
        size = path.stat().st_size
        packed = rec.get("bytes") == size
        index = read_index(path, size)
        if index is None:  # no index, or one written for another version of this tar: read the tar itself
            index, found = scan_shard(path, caption_column)
            problems += found
            lost += max(len(found), rec.get("samples", 0) - len(index))
        parts.append(index.with_shard(k))
        h.update(json.dumps([rec["name"], rec.get("sha256") if packed else size]).encode())
    names = manifest["class_names"] if manifest is not None else []
    index = SampleIndex.concat(parts)
    top = int(index.label.max()) if len(index) else -1
    if not names and top >= 0:  # WebDataset .cls files without names: the classes are their numbers
        names = [str(i) for i in range(top + 1)]
    if top >= len(names):
        raise UserError(f"{root}: a sample's class index {top} is past the {len(names)} classes of {MANIFEST}")
    return ShardSet([root / r["name"] for r in records], index, list(names), h.hexdigest(), problems, lost)
