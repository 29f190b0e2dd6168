"""Runs under ``torchrun --nproc-per-node 2`` (tests/test_distributed.py): several tiny runs in one process group.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR

Each run writes OUT_DIR/<name>; the test repeats the same configs in one process and compares weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentdiff.training.config import RunConfig, load_config

# fp32: these runs compare splits of one batch at fp32 rounding (bf16 autocast, auto on a CPU with bf16 units,
# rounds each split differently)
STEPS = ["train.steps=3", "train.log_every=1", "train.checkpoint_every=0", "train.grid_samples=4",
         "train.grid_steps=2", "train.warmup_steps=1", "data.limit=64", "train.batch_size=8", "train.precision=fp32"]

# name -> (preset, overrides); every run has a global batch of 8 images (the CLI test runs the diffusion one)
RUNS = {
    "accum": ("digits-tiny", ["data.hflip=true", "train.grad_accum=2"]),  # 2 processes × 2 micro-steps × 2 images
    "autoencoder": ("ae-mnist", ["data.source=digits", "data.image_size=16", "data.hflip=true",
                                 "autoencoder.base_channels=8", "autoencoder.channel_mult=[1,2]",
                                 "ae_loss.disc_start=2", "ae_loss.disc_norm=group"]),  # GAN on in step 3
    "clip": ("clip-fashion", ["data.source=digits", "data.image_size=16", "data.hflip=true",
                              "clip.caption_template=a digit {}", "clip.patch_size=4", "clip.vision_width=32",
                              "clip.vision_layers=1", "clip.text_width=32", "clip.text_layers=1",
                              "clip.embed_dim=32"]),
}
# resumed under torchrun: 2 steps, resume to 4 == 4 straight (dropout on: each rank's own RNG stream)
RESUME = ("digits-tiny", ["unet.dropout=0.1", "data.hflip=true", "train.checkpoint_every=2"])


def config(name: str, steps: int = 3) -> RunConfig:
    """The config of run ``name`` ('resume' for the resume runs)."""
    preset, extra = RESUME if name == "resume" else RUNS[name]
    return load_config(preset, STEPS + extra + [f"train.steps={steps}"])


def main(out: Path) -> None:
    """Every run of RUNS, then the resume pair, in this process group."""
    from latentdiff.training import distributed, make_trainer

    for name in RUNS:
        make_trainer(config(name), out / name, device="cpu", progress=False).run()
    make_trainer(config("resume", 4), out / "straight", device="cpu", progress=False).run()
    make_trainer(config("resume", 2), out / "split", device="cpu", progress=False).run()
    make_trainer(config("resume", 4), out / "split", resume=True, device="cpu", progress=False).run()
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
