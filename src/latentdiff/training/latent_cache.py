"""The latent cache on disk: parts encoded by all processes, a manifest, memory-mapped reads.

A cache is one folder per (data, autoencoder, flips) fingerprint. The images are cut into parts of up to
``part_images`` images (per aspect bucket, in index order); under torchrun part j is encoded by rank
j mod world_size on its own device, so N processes each encode 1/N. Each part is one safetensors file,
written atomically; the manifest, written by rank 0 once every part is there, marks the cache complete.
An encoding killed half-way leaves finished parts, and the next start encodes only the missing ones.

Training maps the parts into memory (numpy memmap over the safetensors data): a batch reads its rows, the
operating system keeps what fits in the page cache, and the cache's size is bounded by disk, not RAM.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from latentdiff.data import ImageData, StreamedImages
from latentdiff.data.loader import Prefetcher
from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import is_temp_file, load_json, save_json, save_tensors
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.training import distributed
from latentdiff.training.distributed import DistEnv

FORMAT = "latentdiff-latents/1"
MANIFEST = "manifest.json"
_DTYPES = {"F32": np.float32, "I64": np.int64}


def plan_parts(data: ImageData | StreamedImages, part_images: int) -> list[tuple[str, torch.Tensor]]:
    """(file name, image indices) of every part: each bucket's images in index order, cut every part_images."""
    bucket = getattr(data, "bucket", None)
    groups = [torch.arange(len(data))] if bucket is None else \
        [torch.from_numpy(np.flatnonzero(bucket == b)) for b in np.unique(bucket)]
    parts = []
    for g, members in enumerate(groups):
        for k, chunk in enumerate(members.split(part_images)):
            parts.append((f"b{g:02d}-{k:05d}.safetensors", chunk))
    return parts


def build_cache(folder: Path, data: ImageData | StreamedImages, ae: Autoencoder, hflip: bool, device: torch.device,
                dist: DistEnv, meta: dict[str, Any], batch_size: int = 64, workers: int = 0,
                part_images: int = 4096, collective: bool = True) -> None:
    """Encode the parts of ``folder`` that are missing, this rank's share of them, then write the manifest.

    With ``collective`` every rank of ``dist`` must call it (it synchronises them); one process encodes all.
    """
    barrier = distributed.barrier if collective else (lambda: None)
    parts = plan_parts(data, part_images)
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():  # what a killed encoder left half-written
            if is_temp_file(p):
                p.unlink(missing_ok=True)
    barrier()
    mine = [(name, idx) for j, (name, idx) in enumerate(parts) if j % dist.world_size == dist.rank
            and not _complete(folder / name, idx)]
    if dist.is_main:
        todo = sum(1 for name, idx in parts if not _complete(folder / name, idx))
        print(f"encoding {len(data)} images to latents in {todo} of {len(parts)} part(s) on {dist.world_size} "
              f"process(es) (once; cached in {folder})", file=sys.stderr)
    if mine:
        ae = ae.to(device).eval()
        batches = [b for _, idx in mine for b in idx.split(batch_size)]
        loader = Prefetcher(data, workers) if isinstance(data, StreamedImages) else None
        k = 0
        try:
            for name, idx in mine:
                out: dict[str, list[torch.Tensor]] = {}
                for b in idx.split(batch_size):
                    k += 1
                    x, used = _pixels(data, loader, b, _Tail(batches, k))
                    _append(out, "used", used)
                    _encode_into(out, ae, x.to(device), hflip)
                tensors = {key: torch.cat(v) for key, v in out.items()} | {"index": idx}
                save_tensors(tensors, folder / name, {"format": FORMAT})
        finally:
            if loader is not None:
                loader.close()
    barrier()
    if dist.is_main:
        missing = [name for name, idx in parts if not _complete(folder / name, idx)]
        if missing:
            raise UserError(f"{folder}: latent parts {', '.join(missing[:3])} were not written; run again")
        save_json(meta | {"format": FORMAT, "images": len(data), "hflip": hflip, "parts": [n for n, _ in parts]},
                  folder / MANIFEST)
    barrier()


class _Tail:
    """batches[start:], iterable more than once without copying the list."""

    def __init__(self, batches: list[torch.Tensor], start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.batches[i] for i in range(self.start, len(self.batches)))


def _pixels(data: ImageData | StreamedImages, loader: Prefetcher | None, idx: torch.Tensor,
            later: _Tail) -> tuple[torch.Tensor, torch.Tensor]:
    if loader is None:
        return data.batch(idx), idx
    got = loader.get(idx, later)
    return from_uint8_image(got["pixels"]), got["used"]


@torch.no_grad()
def _encode_into(out: dict[str, list[torch.Tensor]], ae: Autoencoder, x: torch.Tensor, hflip: bool) -> None:
    """Append the posterior moments of ``x`` (and of its mirror image with flips) to ``out``."""
    for suffix, xx in [("", x)] + ([("_flip", x.flip(-1))] if hflip else []):
        q = ae.encode(xx)
        _append(out, "mean" + suffix, q.mean.float().cpu())
        _append(out, "std" + suffix, q.std.float().cpu())


def _append(out: dict[str, list[torch.Tensor]], key: str, value: torch.Tensor) -> None:
    out.setdefault(key, []).append(value)


def _complete(path: Path, idx: torch.Tensor) -> bool:
    """A part file that holds exactly these images (parts are written atomically: present means whole)."""
    if not path.is_file():
        return False
    try:
        index = map_safetensors(path)["index"]
    except (UserError, KeyError):
        return False
    return index.shape == tuple(idx.shape) and bool(np.array_equal(index, idx.numpy()))


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only numpy memory maps (nothing read until used)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        base = 8 + n
        return {k: np.memmap(path, _DTYPES[v["dtype"]], "r", base + v["data_offsets"][0], tuple(v["shape"]))
                for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise UserError(f"{path}: not a readable latent cache part ({type(e).__name__}: {e})") from None


class LatentShards:
    """A complete cache folder, memory-mapped: the moments of any images, by index."""

    def __init__(self, folder: Path, n: int) -> None:
        manifest = load_json(folder / MANIFEST)
        self.parts = [map_safetensors(folder / name) for name in manifest["parts"]]
        self.part_of = np.full(n, -1, np.int32)
        self.row_of = np.zeros(n, np.int64)
        for p, part in enumerate(self.parts):
            self.part_of[part["index"]] = p
            self.row_of[part["index"]] = np.arange(len(part["index"]))
        if (self.part_of < 0).any():
            raise UserError(f"{folder}: the latent cache lacks {(self.part_of < 0).sum()} images; delete the folder")

    def gather(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of tensor ``key`` (mean, std, mean_flip, std_flip, used), all of one shape."""
        idx_np = idx.numpy()
        parts = self.part_of[idx_np]
        first = self.parts[int(parts[0])][key]
        out = np.empty((len(idx_np), *first.shape[1:]), first.dtype)
        for p in np.unique(parts):
            sel = parts == p
            out[sel] = self.parts[int(p)][key][self.row_of[idx_np[sel]]]
        return torch.from_numpy(out)

    def has(self, key: str) -> bool:
        """Whether the parts hold tensor ``key`` (the mirrored moments exist only with flips)."""
        return key in self.parts[0]
