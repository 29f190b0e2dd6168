"""Streaming generation: each batch is written as it finishes, a rerun skips what exists, the grid is bounded.

Image i of a run uses seed + i whatever the batch (pipelines' per-sample noise), so a batch can be drawn
on its own: drawing n images is drawing batches [start, start + batch_size) one after the other with
seed + start. Each is written atomically (PNG per image, named by its seed; or one .npz shard per batch)
before the next starts, so memory does not grow with n and a killed run loses at most one batch. A rerun
with the same arguments finds the finished files and skips their batches, so it ends with exactly the
images an uninterrupted run writes. grid.png tiles at most the first GRID_MAX images.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from latentdiff.data.images import make_grid, read_png_settings, save_png, to_pil, upscale_nearest
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write
from latentdiff.models.settings import SampleSettings

FORMATS = ("png", "npz")
GRID_MAX = 64  # grid.png tiles at most this many images (the first ones)
# settings that may differ between a run and the files it reuses: they do not change an image
NOT_IMAGE_SETTINGS = ("seed", "n_samples", "batch_size", "seconds_per_image", "nfe")


@dataclass(frozen=True)
class Streamed:
    """What a streaming run did: images drawn now, images found from an earlier run, the grid, NFE per image."""

    drawn: int
    reused: int
    grid: Optional[Path]
    nfe: float
    seconds_per_image: float


def batch_files(out_dir: Path, fmt: str, seed: int, start: int, end: int) -> list[Path]:
    """The files of images start … end-1: one PNG each named by its seed, or one .npz shard for the batch."""
    if fmt == "png":
        return [out_dir / f"{seed + i:06d}.png" for i in range(start, end)]
    return [out_dir / f"{seed + start:06d}-{seed + end - 1:06d}.npz"]


def _per_batch(value: Any, n: int, start: int, end: int) -> Any:
    """A per-sample value (a sequence or tensor of n) cut to the batch; a shared one as it is."""
    if isinstance(value, (tuple, list, torch.Tensor)) and not isinstance(value, str) and len(value) == n and n > 1:
        return value[start:end]
    return value


def _write(images: torch.Tensor, files: list[Path], fmt: str, meta: dict[str, Any], seed: int) -> None:
    if fmt == "png":
        for k, (img, path) in enumerate(zip(images, files)):
            save_png(to_pil(img), path, meta | {"seed": seed + k})
        return
    buf = io.BytesIO()
    np.savez(buf, images=images.cpu().numpy(), seeds=np.arange(seed, seed + len(images)),
             settings=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write(files[0], lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def read_batch(files: list[Path], fmt: str) -> torch.Tensor:
    """The images (uint8 (N, C, H, W)) of a finished batch's files."""
    if fmt == "npz":
        with np.load(files[0]) as z:
            return torch.from_numpy(z["images"])
    from PIL import Image

    arrays = []
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def _settings_of(path: Path) -> dict[str, Any]:
    """The settings a finished PNG or .npz shard records."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return json.loads(str(z["settings"]))
    return read_png_settings(path)


def _same_image_settings(found: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """Refuse to reuse a file drawn with other settings (it would mix two runs in one folder)."""
    differ = sorted(k for k in set(found) | set(meta) if k not in NOT_IMAGE_SETTINGS and found.get(k) != meta.get(k))
    if differ:
        k = differ[0]
        raise UserError(f"{path} was drawn with {k}={found.get(k)!r}, not {meta.get(k)!r}: use another --out "
                        "or --overwrite")


def stream_images(pipe: Any, settings: SampleSettings, out_dir: Path | str, meta: dict[str, Any], fmt: str = "png",
                  overwrite: bool = False, inputs: Optional[dict[str, Any]] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> Streamed:
    """Draw ``settings.n_samples`` images batch by batch with ``pipe.run``, writing each batch before the next.

    ``meta``: what every file records (the settings as run). Batches whose files exist are skipped
    (``overwrite`` draws them again); ``inputs``: run's task inputs (images, mask, low_res), one or one
    per sample. ``progress(done, n)`` after every batch. Returns counts, grid path and NFE per image.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; --out must be a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    n, b, seed = settings.n_samples, settings.batch_size, settings.seed
    meta = {k: v for k, v in meta.items() if k != "n_samples"} | {"model": str(pipe.path)}
    first: list[torch.Tensor] = []  # the grid's images: at most GRID_MAX
    drawn = reused = 0
    nfe_sum, seconds = 0.0, 0.0
    for start in range(0, n, b):
        end = min(n, start + b)
        files = batch_files(out_dir, fmt, seed, start, end)
        if not overwrite and all(p.exists() for p in files):
            _same_image_settings(_settings_of(files[0]), meta, files[0])
            if start < GRID_MAX:  # the grid's images are read back; the rest are not opened
                first.append(read_batch(files, fmt)[: GRID_MAX - start])
            reused += end - start
        else:
            part = settings.replace(n_samples=end - start, seed=seed + start,
                                    **{k: _per_batch(getattr(settings, k), n, start, end)
                                       for k in ("class_label", "prompt", "negative_prompt")})
            batch_inputs = {k: v if k == "mask" else _per_batch(v, n, start, end)  # one mask (H, W) for all
                            for k, v in (inputs or {}).items() if v is not None}
            t0 = time.perf_counter()
            images, nfe = pipe.run(part, **batch_inputs)
            dt = time.perf_counter() - t0
            _write(images, files, fmt, meta | {"nfe": nfe, "seconds_per_image": dt / len(images)}, seed + start)
            if start < GRID_MAX:
                first.append(images[: GRID_MAX - start].clone())
            drawn += end - start
            nfe_sum, seconds = nfe_sum + nfe * (end - start), seconds + dt
            del images
        if progress is not None:
            progress(end, n)
    grid = out_dir / "grid.png"
    save_png(make_grid(upscale_nearest(torch.cat(first))), grid, meta)
    return Streamed(drawn, reused, grid, nfe_sum / drawn if drawn else 0.0, seconds / drawn if drawn else 0.0)
