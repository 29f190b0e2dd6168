"""Encode a data set to latents once and train on the cache (DESIGN.md, performance habits).

The cache holds the posterior moments (mean, std) of every image, and of its mirror image when
flips are on, so training can still draw z ~ q(z|x) (LDM) at no encoder cost. It lives beside the
autoencoder's weights and is keyed by both fingerprints: another data set or another autoencoder
rebuilds it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from latentdiff.data import ImageData
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_tensors, save_tensors
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.models.concat import concat_channels


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (identifies an autoencoder's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LatentData:
    """A data set as cached posterior moments; ``batch`` draws scaled latents s · (z − shift).

    Encoding runs in batches of 64: on a CPU 1.4-1.6x the images/s of 256 (the activations stay in cache).
    """

    def __init__(self, images: ImageData, autoencoder: Autoencoder, ae_fingerprint: str, cache_dir: Path,
                 hflip: bool, device: torch.device, batch_size: int = 64) -> None:
        self.labels, self.class_names = images.labels, images.class_names
        self.fingerprint = hashlib.sha256(f"{images.fingerprint}:{ae_fingerprint}:{hflip}".encode()).hexdigest()
        self.scale, self.shift = autoencoder.config.scale_factor, autoencoder.config.shift_factor
        path = cache_dir / f"{self.fingerprint[:24]}.safetensors"
        cached = load_tensors(path) if path.is_file() else None
        if cached is None or cached["mean"].shape[0] != len(images):
            cached = self._encode(images, autoencoder, hflip, device, batch_size)
            try:
                save_tensors(cached, path, {"data": images.fingerprint, "autoencoder": ae_fingerprint})
            except OSError as e:  # a read-only model folder: train on, just without the cache
                print(f"note: cannot write the latent cache {path} ({e})", file=sys.stderr)
        self.mean, self.std = cached["mean"], cached["std"]
        self.mean_flip, self.std_flip = cached.get("mean_flip"), cached.get("std_flip")
        self.shape = tuple(self.mean.shape[1:])

    @staticmethod
    @torch.no_grad()
    def _encode(images: ImageData, ae: Autoencoder, hflip: bool, device: torch.device,
                batch_size: int) -> dict[str, torch.Tensor]:
        print(f"encoding {len(images)} images to latents (once; cached)", file=sys.stderr)
        out: dict[str, list[torch.Tensor]] = {"mean": [], "std": []} | ({"mean_flip": [], "std_flip": []} if hflip else {})
        ae = ae.to(device).eval()
        for start in range(0, len(images), batch_size):
            x = images.batch(torch.arange(start, min(start + batch_size, len(images)))).to(device)
            for suffix, xx in [("", x)] + ([("_flip", x.flip(-1))] if hflip else []):
                q = ae.encode(xx)
                out["mean" + suffix].append(q.mean.float().cpu())
                out["std" + suffix].append(q.std.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device) -> "LatentData":
        """Move the cached moments to ``device`` (a trainer on a GPU draws its batches there)."""
        for name in ("mean", "std", "mean_flip", "std_flip"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def batch(self, idx: torch.Tensor, generator: torch.Generator, flip: bool, sample: bool,
              return_flips: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents of images ``idx``: z = s · (μ + σ ε − shift), mirrored at random when ``flip``.

        With ``return_flips`` also which images were mirrored (bool (B,)), for inputs made from the pixels.
        """
        on = self.mean.device  # the generator's too (training/batches.py)
        idx = idx.to(on, non_blocking=True)
        mean, std = self.mean[idx], self.std[idx]
        mirrored = torch.zeros(len(idx), dtype=torch.bool, device=on)
        if flip:
            mirrored = torch.rand(len(idx), generator=generator, device=on) < 0.5
            mean = torch.where(mirrored[:, None, None, None], self.mean_flip[idx], mean)
            std = torch.where(mirrored[:, None, None, None], self.std_flip[idx], std)
        z = mean + std * torch.randn(mean.shape, generator=generator, device=on) if sample else mean
        z = self.scale * (z - self.shift)
        return (z, mirrored) if return_flips else z


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
