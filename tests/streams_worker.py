"""Runs under ``torchrun --nproc-per-node 2`` (tests/test_latent_cache.py): both ranks build one latent cache, then
train from WebDataset shards, each rank decoding its own rows in its own DataLoader worker.

    torchrun --standalone --nproc-per-node 2 tests/streams_worker.py OUT_DIR

OUT_DIR/shards must hold the shards (the test packs them); writes OUT_DIR/cache and OUT_DIR/run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from latentdiff.data import DataConfig, ImageData, load_dataset
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.training.config import RunConfig, load_config

PART_IMAGES = 8  # 40 images: 5 parts, ranks 0 and 1 take turns


def inputs() -> tuple[ImageData, Autoencoder]:
    """40 digits at 16 px and a small untrained autoencoder (seeded: the same on every rank)."""
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), attn_in_mid=False)).eval()
    return load_dataset(DataConfig(source="digits", image_size=16, limit=40)), ae


def shard_run(shards: Path) -> RunConfig:
    """A 3-step run on the shards (batch 8: 4 rows per rank), one decoding worker per process."""
    return load_config("digits-tiny", [f"data.source={shards}", "data.workers=1", "data.hflip=true",
                                       "unet.num_classes=10", "train.steps=3", "train.batch_size=8",
                                       "train.log_every=1", "train.checkpoint_every=0", "train.grid_samples=2",
                                       "train.grid_steps=2", "train.warmup_steps=1",
                                       "train.precision=fp32"])  # compared with one process at fp32 rounding


def main(out: Path) -> None:
    """The cache (each rank encodes its parts; rank 0 writes the manifest), then the run from shards."""
    from latentdiff.training import distributed, make_trainer
    from latentdiff.training.latents import LatentData

    from latentdiff.data.loader import Prefetcher

    env, device = distributed.setup(torch.device("cpu"))
    data, ae = inputs()
    LatentData(data, ae, "test-autoencoder", out / "cache", hflip=True, device=device, dist=env,
               part_images=PART_IMAGES)
    asked, get = [], Prefetcher.get  # the rows this process had its worker decode, batch by batch

    def recorded(self, want, later):
        asked.append(want.tolist())
        return get(self, want, later)

    Prefetcher.get = recorded
    trainer = make_trainer(shard_run(out / "shards"), out / "run", device="cpu", progress=False)
    orders = []
    draw = trainer.draw
    trainer.draw = lambda: (lambda b: orders.append(b["idx"].tolist()) or b)(draw())
    trainer.run()
    (out / f"decoded.rank{env.rank}.json").write_text(json.dumps({"asked": asked, "batches": orders}))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
