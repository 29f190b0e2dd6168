"""A folder of image files as a data source: labels from class sub-folders, captions beside the images."""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data.captions import read_captions
from latentdiff.data.config import EMBEDDED, DataConfig
from latentdiff.data.decode import decode_image, image_file_problem
from latentdiff.data.source import SourceImages, check_memory, in_test
from latentdiff.errors import UserError

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


def load_folder(cfg: DataConfig) -> SourceImages:
    """The images under the folder ``cfg.source``, split by a hash of their paths, bad files skipped or refused."""
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
    use_captions = cfg.captions == "require" or bool(captioned)
    if use_captions and len(captioned) < len(files):
        # Checked over the whole folder, before decoding: both splits agree and errors come early.
        lacking = [f for f in files if f not in captioned]
        why = ("data.captions='require'" if cfg.captions == "require"
               else f"data.captions='auto' needs all or none, and {len(captioned)} have one")
        more = f" (and {len(lacking) - 5} more)" if len(lacking) > 5 else ""
        raise UserError(f"{root}: {len(lacking)} of {len(files)} images have no caption ({why}): "
                        f"{', '.join(lacking[:5])}{more}; add metadata.jsonl lines or .txt files, "
                        f"or set data.captions=ignore{hint}")
    if not captioned and hint:
        log.warning("%s: no captions found%s", root, hint)
    # Every file of both splits is checked cheaply first (special files never opened), so a bad held-out
    # file is reported now, not when `eval` trips on it.
    bad = find_bad_files(root, files)
    if bad and cfg.on_bad_file == "fail":
        rel = next(iter(bad))
        raise UserError(f"{root / rel}: cannot read image ({bad[rel]})")
    # Split by a hash of the relative path, so adding files never moves existing ones across.
    split = [f for f in files if in_test(f) == (cfg.split == "test")]
    if not split:
        raise UserError(f"{root}: the {cfg.split!r} split is empty ({len(files)} images; 'test' holds ~10%)")
    found = [f for f in split if f in bad]
    images, kept, bad_decodes = _decode_all(root, [f for f in split if f not in bad], cfg,
                                            {f: bad[f] for f in found})
    skipped = {f: bad[f] for f in found} | bad_decodes
    if skipped:
        first = next(iter(skipped))
        other = len(bad) - len(found)
        elsewhere = f"; {other} more in the other split" if other else ""
        log.warning("%s: skipped %d unreadable image file(s); first: %s (%s)%s", root, len(skipped), first,
                    skipped[first], elsewhere)
    elif bad:
        other = "test" if cfg.split == "train" else "train"
        first = next(iter(bad))
        log.warning("%s: %d unreadable image file(s) in the %r split (not used by this run; eval would skip them); "
                    "first: %s (%s)", root, len(bad), other, first, bad[first])
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[f.split("/", 1)[0]] for f in kept], dtype=torch.int64) if labelled else None
    # Built from `kept`, so images skipped as unreadable drop their captions too.
    captions = [captioned[f] for f in kept] if use_captions else None
    return SourceImages(images, labels, names, kept, captions)


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
