"""Training the denoiser: data → (20.8) noising → UNet → weighted MSE → AdamW → EMA → checkpoints."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.diffusion import as_eps_fn, diffusion_loss, sample
from latentdiff.errors import UserError
from latentdiff.models.folder import save_model_folder
from latentdiff.models.unet import UNet
from latentdiff.training.ema import EMA
from latentdiff.training.loop import TrainingRun


class DiffusionTrainer(TrainingRun):
    """Trains a UNet to predict ε, x0 or v; samples and exports its EMA copy."""

    kind = "UNet"

    def build(self) -> None:
        """UNet, its EMA copy, AdamW and the noise schedule."""
        self._check_shapes()
        tc = self.cfg.train
        self.schedule = self.cfg.diffusion.build_schedule()
        self.model = UNet(self.cfg.unet).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        """The trained UNet and its EMA copy."""
        return {"model": self.model, "ema": self.ema.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW."""
        return {"model": self.opt}

    def _check_shapes(self) -> None:
        u, d = self.cfg.unet, self.cfg.data
        if u.in_channels != d.channels or u.out_channels != d.channels:
            raise UserError(f"unet.in_channels/out_channels ({u.in_channels}/{u.out_channels}) must equal "
                            f"data.channels ({d.channels}) for pixel-space diffusion")
        if u.num_classes is not None:
            if self.data.labels is None:
                raise UserError(f"unet.num_classes={u.num_classes} but the data set {d.source!r} has no class labels")
            if int(self.data.labels.max()) >= u.num_classes:
                raise UserError(f"unet.num_classes={u.num_classes} but the data has "
                                f"{int(self.data.labels.max()) + 1} classes")

    def train_step(self) -> dict[str, float] | None:
        """One AdamW step on a batch; skipped (None) when the loss is not finite."""
        tc = self.cfg.train
        x0, idx = self.next_batch()
        labels = self.data.labels[idx].to(self.device) if self.cfg.unet.num_classes is not None else None

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, torch.bfloat16) if tc.bf16 else nullcontext():
                return self.model(z_t, t, class_labels=labels)

        d = self.cfg.diffusion
        loss = diffusion_loss(model_fn, x0, self.schedule, d.prediction, d.weighting, d.min_snr_gamma, self.noise_gen)
        if self.skip_nonfinite(loss):
            return None
        self.clip_and_step(self.opt, self.model.parameters(), loss)
        self.ema.update(self.model, self.step + 1)
        return {"loss": float(loss.detach())}

    def manifest(self) -> dict[str, Any]:
        """What a pipeline needs beside the weights."""
        d = self.cfg.data
        return {"step": self.step, "diffusion": dataclasses.asdict(self.cfg.diffusion),
                "image_size": d.image_size, "channels": d.channels, "class_names": self.data.class_names,
                "data": {"source": d.source, "fingerprint": self.data.fingerprint, "images": len(self.data)}}

    def export(self) -> None:
        """The model folder holds the EMA weights."""
        save_model_folder(self.out, self.ema.model, self.cfg.unet, self.manifest())

    @torch.no_grad()
    def preview(self) -> Path:
        """Sample a grid from the EMA model with a fixed seed, so grids over training are comparable."""
        tc, d = self.cfg.train, self.cfg.data
        n = tc.grid_samples
        g = torch.Generator().manual_seed(tc.seed)
        noise = torch.randn(n, d.channels, d.image_size, d.image_size, generator=g).to(self.device)
        labels = None
        if self.cfg.unet.num_classes is not None:
            labels = (torch.arange(n) % self.cfg.unet.num_classes).to(self.device)
        eps_fn = as_eps_fn(lambda x, t: self.ema.model(x, t, class_labels=labels), self.schedule,
                           self.cfg.diffusion.prediction)
        x = sample(eps_fn, noise, self.schedule, tc.grid_sampler, tc.grid_steps, generator=g, clip_x0=1.0)
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        path = self.out / "samples" / f"step_{self.step:08d}.png"
        save_png(make_grid(upscale_nearest(images)), path,
                 {"step": self.step, "sampler": tc.grid_sampler, "steps": tc.grid_steps, "seed": tc.seed})
        return path
