"""Training loops: the shared run loop, the diffusion, autoencoder and CLIP trainers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from latentdiff.training.config import RunConfig

if TYPE_CHECKING:
    from latentdiff.training.loop import TrainingRun


def make_trainer(cfg: RunConfig, out_dir: Path | str, resume: bool = False, device: str = "auto",
                 progress: bool | None = None, started: float | None = None) -> "TrainingRun":
    """The trainer for ``cfg.model`` ('diffusion', 'autoencoder' or 'clip')."""
    if cfg.model == "autoencoder":
        from latentdiff.training.autoencoder_trainer import AutoencoderTrainer as cls
    elif cfg.model == "clip":
        from latentdiff.training.clip_trainer import CLIPTrainer as cls
    else:
        from latentdiff.training.diffusion_trainer import DiffusionTrainer as cls
    return cls(cfg, out_dir, resume=resume, device=device, progress=progress, started=started)
