"""Encode a data set to latents once and train on the cache (DESIGN.md, performance habits).

The cache holds the posterior moments (mean, std) of every image, and of its mirror image when
flips are on, so training can still draw z ~ q(z|x) (LDM) at no encoder cost. It lives beside the
autoencoder's weights and is keyed by both fingerprints: another data set or another autoencoder
rebuilds it. It is written in parts by all processes and read memory-mapped (training/latent_cache.py).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from latentdiff.data import ImageData, StreamedImages
from latentdiff.data.tar_shards import file_sha256
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.models.concat import concat_channels
from latentdiff.training import distributed
from latentdiff.training.distributed import DistEnv
from latentdiff.training.latent_cache import MANIFEST, LatentShards, build_cache


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (identifies an autoencoder's weights)."""
    return file_sha256(path)


class LatentData:
    """A data set as cached posterior moments; ``batch`` draws scaled latents s · (z − shift).

    Encoding runs in batches of 64: on a CPU 1.4-1.6x the images/s of 256 (the activations stay in cache).
    Every process of a torchrun group must construct it together: each encodes its share of the parts.
    """

    def __init__(self, images: ImageData | StreamedImages, autoencoder: Autoencoder, ae_fingerprint: str,
                 cache_dir: Path, hflip: bool, device: torch.device, batch_size: int = 64,
                 dist: DistEnv | None = None, workers: int = 0, part_images: int = 4096) -> None:
        self.labels, self.class_names = images.labels, images.class_names
        self.fingerprint = hashlib.sha256(f"{images.fingerprint}:{ae_fingerprint}:{hflip}".encode()).hexdigest()
        self.scale, self.shift = autoencoder.config.scale_factor, autoencoder.config.shift_factor
        dist = dist or DistEnv()
        folder = cache_dir / self.fingerprint[:24]
        if not (folder / MANIFEST).is_file():
            if not distributed.broadcast_flag(_writable(cache_dir) if dist.is_main else False, device):
                # a read-only model folder: train on, from a cache of this process's own that goes at exit
                print(f"note: cannot write the latent cache in {cache_dir}; encoding into a temporary folder",
                      file=sys.stderr)
                folder, dist = Path(tempfile.mkdtemp(prefix="latentdiff-latents-")), DistEnv()
                atexit.register(shutil.rmtree, folder, True)
            meta = {"data": images.fingerprint, "autoencoder": ae_fingerprint}
            build_cache(folder, images, autoencoder, hflip, device, dist, meta, batch_size, workers, part_images,
                        collective=dist.active)
        self.folder = folder
        self.cache = LatentShards(folder, len(images))

    def __len__(self) -> int:
        return len(self.cache.part_of)

    def moments(self, idx: torch.Tensor, mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (mean, std) of q(z|x) for images ``idx`` (of their mirror images with ``mirrored``)."""
        suffix = "_flip" if mirrored else ""
        return self.cache.gather("mean" + suffix, idx), self.cache.gather("std" + suffix, idx)

    def used(self, idx: torch.Tensor) -> torch.Tensor:
        """The images whose latents stand for ``idx`` (an unreadable streamed image was replaced by another)."""
        return self.cache.gather("used", idx)

    def batch(self, idx: torch.Tensor, generator: torch.Generator, flip: bool, sample: bool,
              return_flips: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents of images ``idx``: z = s · (μ + σ ε − shift), mirrored at random when ``flip``.

        With ``return_flips`` also which images were mirrored (bool (B,)), for inputs made from the pixels.
        """
        on = generator.device  # the trainer's device (training/batches.py): the moments are gathered on the host
        mean, std = (m.to(on, non_blocking=True) for m in self.moments(idx))
        mirrored = torch.zeros(len(idx), dtype=torch.bool, device=on)
        if flip:
            mirrored = torch.rand(len(idx), generator=generator, device=on) < 0.5
            mean_flip, std_flip = (m.to(on, non_blocking=True) for m in self.moments(idx, mirrored=True))
            mean = torch.where(mirrored[:, None, None, None], mean_flip, mean)
            std = torch.where(mirrored[:, None, None, None], std_flip, std)
        z = mean + std * torch.randn(mean.shape, generator=generator, device=on) if sample else mean
        z = self.scale * (z - self.shift)
        return (z, mirrored) if return_flips else z


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_latent_shapes(image_size: int, autoencoder: Autoencoder | None, unet_in: int, unet_out: int,
                        image_channels: int, concat: str | None = None) -> None:
    """The UNet must read and write the autoencoder's latent channels (reading more with cond.concat); f | size."""
    channels = autoencoder.latent_channels if autoencoder is not None else image_channels
    what = "the autoencoder's latent channels" if autoencoder is not None else "data.channels (pixel space)"
    extra = concat_channels(concat, channels, image_channels)
    if unet_out != channels:
        raise UserError(f"unet.out_channels ({unet_out}) must equal {what} ({channels})")
    if unet_in != channels + extra:
        plus = f" + {extra} for cond.concat={concat}" if extra else ""
        raise UserError(f"unet.in_channels ({unet_in}) must be {channels + extra}: {what} ({channels}){plus}")
    if autoencoder is not None:
        if autoencoder.config.in_channels != image_channels:
            raise UserError(f"the autoencoder takes {autoencoder.config.in_channels}-channel images but "
                            f"data.channels is {image_channels}")
        f = autoencoder.downsample_factor
        if image_size % f:
            raise UserError(f"data.image_size {image_size} is not divisible by the autoencoder's factor f={f}")
