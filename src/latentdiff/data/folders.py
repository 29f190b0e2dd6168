"""A folder of image files as a data source: labels from class sub-folders, captions beside the images."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data.captions import read_captions, use_captions
from latentdiff.data.config import EMBEDDED, DataConfig
from latentdiff.data.decode import decode_image, image_file_problem
from latentdiff.data.source import SourceImages, check_memory, in_test
from latentdiff.errors import UserError
from latentdiff.formats.paths import not_a_regular_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of image files under root, sorted; hidden files and folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # ".ipynb_checkpoints", "__MACOSX" and "._x.jpg" (macOS resource forks) are never images.
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in filenames:
            if not f.startswith((".", "__")) and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


@dataclass
class FolderListing:
    """A folder's images of one split, in order, with their labels and captions (nothing decoded yet)."""

    root: Path
    files: list[str]  # relative POSIX paths
    class_names: list[str]
    labels: list[int] | None  # index into class_names per file (first-level sub-folders), or None
    captions: list[str] | None  # per file, or None
    other_split: list[str] = field(default_factory=list)  # the files of the other split (both_splits: none)
    special: dict[str, str] = field(default_factory=dict)  # {file: what it is} of both splits, never listed


def list_folder(cfg: DataConfig, both_splits: bool = False, report_special: bool = True) -> FolderListing:
    """The images under the folder ``cfg.source`` of the split ``cfg.split`` (a hash of their paths), or all;
    special files refused (data.on_bad_file=fail) or left out (with a warning when ``report_special``)."""
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise UserError(f"data.source {cfg.source!r}: no such folder (embedded names: {', '.join(EMBEDDED)})")
    if not root.is_dir():
        raise UserError(f"data.source {cfg.source!r}: is a file; expected a folder of images")
    files = list_images(root)
    if not files:
        raise UserError(f"{root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    # Hugging Face imagefolder: labels from first-level sub-folders when every image sits in one.
    labelled = all("/" in f for f in files)
    names = sorted({f.split("/", 1)[0] for f in files}) if labelled else []
    captioned, hint = read_captions(root, files, cfg.caption_column) if cfg.captions != "ignore" else ({}, "")
    captions_on = use_captions(root, cfg.captions, len(files), [f for f in files if f not in captioned], hint)
    if not captioned and hint:
        log.warning("%s: no captions found%s", root, hint)
    # Special files (FIFOs, sockets, devices) of both splits are told apart by stat alone and never listed:
    # opening a FIFO named x.png blocks its reader forever (this folder's loaders, data pack, streaming).
    special = {f: f"{kind}, not a regular file" if kind.startswith("a ") else kind
               for f in files if (kind := not_a_regular_file(root / f)) is not None}
    if special and cfg.on_bad_file == "fail":
        rel = next(iter(special))
        raise UserError(f"{root / rel}: cannot read image ({special[rel]})")
    if special and report_special:
        rel = next(iter(special))
        log.warning("%s: skipped %d file(s) that are not regular files; first: %s (%s)", root, len(special), rel,
                    special[rel])
    # Split by a hash of the relative path, so adding files never moves existing ones across.
    in_split = [f for f in files if both_splits or in_test(f) == (cfg.split == "test")]
    if not in_split:
        raise UserError(f"{root}: the {cfg.split!r} split is empty ({len(files)} images; 'test' holds ~10%)")
    cands = [f for f in in_split if f not in special]
    other = [f for f in files if f not in special and not both_splits and in_test(f) != (cfg.split == "test")]
    index = {n: i for i, n in enumerate(names)}
    labels = [index[f.split("/", 1)[0]] for f in cands] if labelled else None
    return FolderListing(root, cands, names, labels, [captioned[f] for f in cands] if captions_on else None,
                         other, special)


def load_folder(cfg: DataConfig) -> SourceImages:
    """The images under the folder ``cfg.source``, split by a hash of their paths, bad files skipped or refused."""
    listing = list_folder(cfg, report_special=False)
    root = listing.root
    # Every file of both splits is checked cheaply first (header and PNG checksums, no pixel decoded), so a
    # bad held-out file is reported now, not when `eval` trips on it.
    bad = listing.special | find_bad_files(root, listing.files + listing.other_split)
    if bad and cfg.on_bad_file == "fail":
        rel = next(iter(bad))
        raise UserError(f"{root / rel}: cannot read image ({bad[rel]})")
    mine = {f: p for f, p in bad.items() if in_test(f) == (cfg.split == "test")}
    images, kept, failed = _decode_all(root, [f for f in listing.files if f not in bad], cfg, mine)
    _report_bad(root, cfg.split, mine | failed, len(bad) - len(mine), bad)
    # Built from `kept`, so images skipped as unreadable drop their labels and captions too.
    row = {f: i for i, f in enumerate(listing.files)}
    labels = None if listing.labels is None else torch.tensor([listing.labels[row[f]] for f in kept],
                                                              dtype=torch.int64)
    captions = None if listing.captions is None else [listing.captions[row[f]] for f in kept]
    return SourceImages(images, labels, listing.class_names, kept, captions)


def _report_bad(root: Path, split: str, skipped: dict[str, str], elsewhere: int, bad: dict[str, str]) -> None:
    """One warning: the unreadable files this split skipped, and those of the other split (unused here)."""
    if skipped:
        first = next(iter(skipped))
        more = f"; {elsewhere} more in the other split" if elsewhere else ""
        log.warning("%s: skipped %d unreadable image file(s); first: %s (%s)%s", root, len(skipped), first,
                    skipped[first], more)
    elif bad:
        other = "test" if split == "train" else "train"
        first = next(iter(bad))
        log.warning("%s: %d unreadable image file(s) in the %r split (not used by this run; eval would skip them); "
                    "first: %s (%s)", root, len(bad), other, first, bad[first])


def find_bad_files(root: Path, files: list[str]) -> dict[str, str]:
    """{relative path: problem} of the files under ``root`` that cannot be images, in ``files``' order, by
    decode.image_file_problem (type and header, no decoding) in a thread pool."""
    # PIL warns (on stderr) about images between 1x and 2x MAX_IMAGE_PIXELS: an error here, counted as bad.
    # Set once around the pool: catch_warnings is not thread-safe.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        problems = pool.map(lambda rel: image_file_problem(root / rel), files, chunksize=64)
        return {rel: p for rel, p in zip(files, problems) if p is not None}


def _decode_all(root: Path, cands: list[str], cfg: DataConfig,
                known_bad: dict[str, str]) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Decode candidates in order until data.limit images are read; bad files per data.on_bad_file.

    Returns the images, their files and {file: problem} of the files that failed to decode. ``known_bad``:
    the split's files already found bad (reported with these when nothing decodes).
    """
    n_max = min(len(cands), cfg.limit or len(cands))
    check_memory(n_max, cfg.channels, cfg.image_size)
    out = np.empty((n_max, cfg.channels, cfg.image_size, cfg.image_size), np.uint8)
    kept: list[str] = []
    failed: dict[str, str] = {}

    def try_decode(rel: str) -> np.ndarray | str:
        try:
            return decode_image(root / rel, cfg.image_size, cfg.channels, cfg.center_crop)
        except Exception as e:  # PIL raises many types on malformed files; all mean "bad file"
            return f"{type(e).__name__}: {e}".replace(str(root / rel), rel)  # name it once

    # PIL *warns* on images over MAX_IMAGE_PIXELS; make that an error so they count as bad files.
    # PIL releases the GIL while decoding and resampling, so threads give real parallelism.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pos = 0
        while len(kept) < n_max and pos < len(cands):
            chunk = cands[pos : pos + min(1024, n_max - len(kept))]  # bounded memory, stops at limit
            pos += len(chunk)
            for rel, res in zip(chunk, pool.map(try_decode, chunk)):
                if isinstance(res, str):
                    if cfg.on_bad_file == "fail":
                        raise UserError(f"{root / rel}: cannot read image ({res})")
                    failed[rel] = res
                else:
                    out[len(kept)] = res
                    kept.append(rel)
    if not kept:
        every = known_bad | failed
        first = next(iter(every), "")
        raise UserError(f"{root}: no decodable images ({len(every)} bad files, first: {first} ({every.get(first)}))")
    return torch.from_numpy(out[: len(kept)].copy() if len(kept) < n_max else out), kept, failed
