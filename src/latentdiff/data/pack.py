"""``latentdiff data pack FOLDER OUT``: a captioned image folder into WebDataset tar shards plus a manifest.

The folder is read as training reads it (data/folders.py: labels from sub-folders, captions from metadata.jsonl
or .txt sidecars, all-or-none). Every image is decoded once to check it and measure it (its width and height
after EXIF rotation go into the index, for aspect buckets); unreadable files are skipped and counted, or
refused with --on-bad-file fail. The image files' bytes are stored unchanged, so training from the shards
decodes exactly the pixels it would decode from the folder. Both splits go in; training splits by the same
hash of each file's relative path.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from latentdiff.data.config import DataConfig
from latentdiff.data.decode import probe_image
from latentdiff.data.folders import list_folder
from latentdiff.data.tar_shards import ShardWriter
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import save_json

MANIFEST = "shards.json"
FORMAT = "latentdiff-shards/1"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_shard_size(text: str) -> tuple[int, int | None]:
    """--shard-size: images per shard ("1000") or bytes per shard ("500MB", "1GiB"): (max images, max bytes)."""
    got = _SIZE.match(str(text))
    if not got or (got[2] is None and "." in got[1]) or float(got[1]) <= 0:
        raise UserError(f"--shard-size {text!r}: give a number of images (1000) or a size (500MB, 1GiB)")
    if got[2] is None:
        return int(got[1]), None
    return 1 << 62, max(1, int(float(got[1]) * _UNITS[got[2].lower()]))


def pack_folder(folder: Path, out: Path, max_count: int, max_bytes: int | None = None, captions: str = "auto",
                caption_column: str = "text", on_bad_file: str = "skip",
                log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write the images of ``folder`` as shards into ``out`` (new or empty); returns the manifest written."""
    cfg = DataConfig(source=str(folder), captions=captions, caption_column=caption_column, on_bad_file=on_bad_file)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new OUT")
    listing = list_folder(cfg, both_splits=True)
    writer = ShardWriter(out, max_count, max_bytes)
    n_bad, first_bad = 0, ""

    def probe(rel: str) -> tuple[bytes, tuple[int, int]] | str:
        try:
            data = (listing.root / rel).read_bytes()
            return data, probe_image(data)
        except Exception as e:  # PIL raises many types on malformed files; all mean "bad file"
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for start in range(0, len(listing.files), 512):
            chunk = range(start, min(start + 512, len(listing.files)))
            for i, got in zip(chunk, pool.map(probe, [listing.files[i] for i in chunk])):
                rel = listing.files[i]
                if isinstance(got, str):
                    if on_bad_file == "fail":
                        raise UserError(f"{listing.root / rel}: cannot read image ({got})")
                    n_bad, first_bad = n_bad + 1, first_bad or f"{rel} ({got})"
                    continue
                data, (w, h) = got
                ext = rel.rsplit(".", 1)[-1].lower()
                writer.write(f"{i:09d}", data, ext, rel, w, h,
                             caption=listing.captions[i] if listing.captions is not None else None,
                             label=listing.labels[i] if listing.labels is not None else None)
            done = min(start + 512, len(listing.files))
            if done == len(listing.files) or done // 10240 > start // 10240:  # a line per ~10 000 images
                log(f"{done}/{len(listing.files)} images checked, {writer.written} packed")
    shards = writer.close()
    if not shards:
        raise UserError(f"{listing.root}: no decodable images ({n_bad} bad files, first: {first_bad})")
    manifest = {"format": FORMAT, "source": str(listing.root), "images": sum(s["samples"] for s in shards),
                "skipped": n_bad, "class_names": listing.class_names, "captions": listing.captions is not None,
                "shards": shards}
    save_json(manifest, out / MANIFEST)  # last: a folder with shards.json holds a complete set
    if n_bad:
        log(f"skipped {n_bad} unreadable image file(s); first: {first_bad}")
    return manifest
