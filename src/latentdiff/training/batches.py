"""What a training step draws: the data order, the images of each batch, and the random streams that live
on the training device.

:class:`Batches` draws the order from a seeded generator whose state is checkpointed (always on the CPU: it
is tiny), so ``--resume`` continues the exact order, mid-epoch too. The order is the same whether the images
sit in memory or are streamed (from a folder or WebDataset shards): the same seed gives the same model from
either. :class:`StreamedBatch` hands this process's rows of each batch to DataLoader workers ahead of time
(data/loader.py) and serves them to the trainer.

On a GPU an in-memory data set is held there as uint8 and the objective's noise ε and the augmentation
(flips, posterior samples of the latent cache) are drawn there by device generators, so a step never waits
for the host (DESIGN.md, performance habits). On the CPU the "device" streams *are* the CPU generators the
trainers always used, and the images are the data set's own tensor: the same code path, the same numbers
as before, and nothing extra in the checkpoint.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import numpy as np
import torch

from latentdiff.data import ImageData
from latentdiff.data.loader import Prefetcher
from latentdiff.data.streamed import StreamedImages
from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError

DEVICE_DATA_SHARE = 0.25  # hold the data set on a GPU when it takes at most this share of its free memory


class Batches:
    """Shuffled epochs over a data set's indices; its position is part of the checkpoint.

    With aspect buckets (``groups``: a bucket per image) every batch holds one bucket: an epoch shuffles each
    bucket, cuts it into whole batches (the rest waits for another epoch's shuffle) and shuffles the batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, groups: np.ndarray | None = None) -> None:
        self.n, self.batch_size = n, batch_size
        self.size = min(batch_size, n)  # a data set smaller than the batch is one batch
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = self._epoch(), 0

    def _epoch(self) -> torch.Tensor:
        if self.groups is None:
            return torch.randperm(self.n, generator=self.generator)
        chunks = []
        for g in torch.unique(self.groups).tolist():
            members = torch.nonzero(self.groups == g).flatten()
            members = members[torch.randperm(len(members), generator=self.generator)]
            k = len(members) // self.size
            chunks.append(members[: k * self.size].view(k, self.size))
        whole = torch.cat(chunks)
        return whole[torch.randperm(len(whole), generator=self.generator)].flatten()

    def next(self) -> torch.Tensor:
        """Indices of the next batch (a batch never straddles two epochs)."""
        if self.pos + self.batch_size > len(self.perm):
            self.perm, self.pos = self._epoch(), 0
        idx = self.perm[self.pos: self.pos + self.size]
        self.pos += len(idx)
        return idx

    def upcoming(self, rows: Callable[[torch.Tensor], torch.Tensor] = lambda b: b) -> "Upcoming":
        """The batches :meth:`next` returns until this epoch ends (``rows`` of each), as of now."""
        return Upcoming(self.perm, self.pos, self.size, self.batch_size, rows)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the exact position."""
        return {"perm": self.perm, "pos": torch.tensor(self.pos), "generator": self.generator.get_state()}

    def load(self, s: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.perm, self.pos = s["perm"], int(s["pos"])
        self.generator.set_state(s["generator"])


class Upcoming:
    """The rest of an epoch's batches, fixed when made; iterable any number of times."""

    def __init__(self, perm: torch.Tensor, pos: int, size: int, batch_size: int,
                 rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.perm, self.pos, self.size, self.batch_size, self.rows = perm, pos, size, batch_size, rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        p = self.pos
        while p + self.batch_size <= len(self.perm):  # as Batches.next: a batch that fits, else a new epoch
            yield self.rows(self.perm[p: p + self.size])
            p += self.size


class StreamedBatch:
    """The images of the current global batch that this process trains on, decoded ahead by workers."""

    def __init__(self, data: StreamedImages, workers: int, own_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.data, self.own_rows = data, own_rows
        self.loader = Prefetcher(data, workers)
        self._batch: torch.Tensor | None = None
        self._got: dict = {}
        self._row: dict[int, int] = {}

    def images(self, idx: torch.Tensor, batch: torch.Tensor | None,
               batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` of global batch ``batch`` in [-1, 1], and the indices of the images used (an
        unreadable one replaced by the next readable one of its bucket)."""
        if batch is not None and batch is not self._batch:  # the first part asked for of a new batch
            self._got = self.loader.get(self.own_rows(batch), batches.upcoming(self.own_rows))
            self._batch, self._row = batch, {i: r for r, i in enumerate(self._got["idx"].tolist())}
        rows = [self._row.get(i) for i in idx.tolist()] if batch is not None else [None]
        if None in rows:  # not rows of this process's share of the batch: decode them here
            got = self.data.rows(idx.tolist())
            if "error" in got:
                raise UserError(got["error"])
            return from_uint8_image(got["pixels"]), got["used"]
        return from_uint8_image(self._got["pixels"][rows]), self._got["used"][rows]

    def close(self) -> None:
        """Stop the workers."""
        self.loader.close()


class DeviceStreams:
    """The data set's images and the ε / augmentation generators, on the training device (module docstring)."""

    def __init__(self, data: ImageData | StreamedImages, device: torch.device, noise_gen: torch.Generator,
                 batch_gen: torch.Generator, seed: int) -> None:
        self.data, self.device = data, device
        self.on_host = device.type == "cpu"
        self.noise = noise_gen if self.on_host else torch.Generator(device).manual_seed(seed + 3)
        self.aug = batch_gen if self.on_host else torch.Generator(device).manual_seed(seed + 4)
        self.images: torch.Tensor | None = None  # the uint8 images on a GPU, when they fit
        if not self.on_host and device.type == "cuda" and isinstance(data, ImageData):  # streamed: decoded per batch
            free, _ = torch.cuda.mem_get_info(device)
            if data.images.numel() <= DEVICE_DATA_SHARE * free:
                self.images = data.images.to(device)
            else:
                print(f"note: the data set ({data.images.numel() / 2**30:.1f} GiB as uint8) stays in host memory",
                      file=sys.stderr)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, without waiting for the device (small tensors: indices, t, coins)."""
        return x if self.on_host else x.to(self.device, non_blocking=True)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` as floats in [-1, 1] on the device."""
        if self.images is not None:
            return from_uint8_image(self.images[self.to_device(idx)])
        if self.on_host:
            return from_uint8_image(self.data.images[idx])
        return from_uint8_image(self.data.images[idx].to(self.device, non_blocking=True))

    def state(self) -> dict[str, torch.Tensor]:
        """The device generators' states (none on the CPU: they are the checkpointed CPU generators)."""
        return {} if self.on_host else {"device.noise": self.noise.get_state(), "device.aug": self.aug.get_state()}

    def load(self, rng: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` saved (a checkpoint written on the CPU has none: fresh streams)."""
        if "device.noise" in rng and not self.on_host:
            self.noise.set_state(rng["device.noise"])
            self.aug.set_state(rng["device.aug"])
