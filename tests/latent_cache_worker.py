"""Runs under ``torchrun --nproc-per-node 2`` (tests/test_latent_cache.py): both ranks build one latent cache.

    torchrun --standalone --nproc-per-node 2 tests/latent_cache_worker.py CACHE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from latentdiff.data import DataConfig, ImageData, load_dataset
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig

PART_IMAGES = 8  # 40 images: 5 parts, ranks 0 and 1 take turns


def inputs() -> tuple[ImageData, Autoencoder]:
    """40 digits at 16 px and a small untrained autoencoder (seeded: the same on every rank)."""
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), attn_in_mid=False)).eval()
    return load_dataset(DataConfig(source="digits", image_size=16, limit=40)), ae


def main(cache_dir: Path) -> None:
    """Each rank encodes its parts; rank 0 writes the manifest."""
    from latentdiff.training import distributed
    from latentdiff.training.latents import LatentData

    env, device = distributed.setup(torch.device("cpu"))
    data, ae = inputs()
    LatentData(data, ae, "test-autoencoder", cache_dir, hflip=True, device=device, dist=env, part_images=PART_IMAGES)
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
