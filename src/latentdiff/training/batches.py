"""What a training step draws: the data order (always on the CPU: it is tiny and checkpointed), and the
images and random streams that live on the training device.

On a GPU the data set is held there as uint8 and the objective's noise ε and the augmentation (flips,
posterior samples of the latent cache) are drawn there by device generators, so a step never waits for
the host (DESIGN.md, performance habits). On the CPU the "device" streams *are* the CPU generators the
trainers always used, and the images are the data set's own tensor: the same code path, the same
numbers as before, and nothing extra in the checkpoint.
"""

from __future__ import annotations

import sys

import torch

from latentdiff.data import ImageData
from latentdiff.data.transforms import from_uint8_image

DEVICE_DATA_SHARE = 0.25  # hold the data set on a GPU when it takes at most this share of its free memory


class Batches:
    """Shuffled epochs over an in-memory dataset; its position is part of the checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch (a batch never straddles two epochs)."""
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos: self.pos + min(self.batch_size, self.n)]
        self.pos += len(idx)
        return idx

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the exact position."""
        return {"perm": self.perm, "pos": torch.tensor(self.pos), "generator": self.generator.get_state()}

    def load(self, s: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.perm, self.pos = s["perm"], int(s["pos"])
        self.generator.set_state(s["generator"])


class DeviceStreams:
    """The data set's images and the ε / augmentation generators, on the training device (module docstring)."""

    def __init__(self, data: ImageData, device: torch.device, noise_gen: torch.Generator,
                 batch_gen: torch.Generator, seed: int) -> None:
        self.data, self.device = data, device
        self.on_host = device.type == "cpu"
        self.noise = noise_gen if self.on_host else torch.Generator(device).manual_seed(seed + 3)
        self.aug = batch_gen if self.on_host else torch.Generator(device).manual_seed(seed + 4)
        self.images: torch.Tensor | None = None  # the uint8 images on a GPU, when they fit
        if not self.on_host and device.type == "cuda":
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
