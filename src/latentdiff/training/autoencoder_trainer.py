"""Training the perceptual-compression stage: autoencoder + LPIPS-style loss + PatchGAN (LDM, Sec. 3.1).

Two optimisers alternate on every step once the discriminator is on (``ae_loss.disc_start``). At each
export the latent scale s = 1/std(E(x)) is measured on the training images and stored in the
autoencoder's config, where latent diffusion reads it (DESIGN.md: z = s · E(x)).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.data.transforms import to_uint8_image
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import Autoencoder, measure_scale_factor
from latentdiff.models.folder import DataInfo, FolderKind, Manifest, save_model_folder
from latentdiff.training.ae_loss import AutoencoderLoss
from latentdiff.training import distributed
from latentdiff.training.loop import Batch, TrainingRun

SCALE_IMAGES = 2048  # images encoded to measure the latent scale


class AutoencoderTrainer(TrainingRun):
    """Trains an Autoencoder with AutoencoderLoss; exports it with its measured latent scale."""

    kind = "autoencoder"

    def build(self) -> None:
        """Autoencoder, loss (with discriminator and perceptual net), two AdamW optimisers."""
        a, d, tc = self.cfg.autoencoder, self.cfg.data, self.cfg.train
        if a.in_channels != d.channels or a.out_channels != d.channels:
            raise UserError(f"autoencoder.in_channels/out_channels ({a.in_channels}/{a.out_channels}) must equal "
                            f"data.channels ({d.channels})")
        if d.image_size % a.downsample_factor:
            raise UserError(f"data.image_size {d.image_size} is not divisible by the autoencoder's "
                            f"factor f={a.downsample_factor}")
        self.model = Autoencoder(a).to(self.device)
        self.loss = AutoencoderLoss(self.cfg.ae_loss, d.channels).to(self.device)
        # LDM trains the autoencoder with Adam(β = 0.5, 0.9): the GAN game needs short momentum memory
        self.opt_g = self.adamw(list(self.model.parameters()) + self.loss.autoencoder_parameters(),
                                lr=tc.lr, betas=(0.5, 0.9), weight_decay=tc.weight_decay)
        self.opt_d = self.adamw(self.loss.discriminator_parameters(), lr=tc.lr, betas=(0.5, 0.9),
                                weight_decay=tc.weight_decay)
        self.train_model = self.parallel(self.model)  # the discriminator and logvar: averaged by optimizer_step
        if self.dist.active:
            self.loss.reduce_grads = distributed.all_reduce_mean_

    def modules(self) -> dict[str, nn.Module]:
        """The autoencoder and the loss (discriminator and learned log-variance)."""
        return {"model": self.model, "loss": _trainable(self.loss)}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Generator (autoencoder) and discriminator optimisers."""
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def draw(self) -> Batch:
        """Indices and flips of the global batch, and the ε of each image's posterior sample z = μ + σ ε."""
        batch = super().draw()
        f, size = self.model.downsample_factor, self.cfg.data.image_size
        shape = (len(batch["idx"]), self.model.latent_channels, size // f, size // f)
        return batch | {"eps": torch.randn(shape, generator=self.noise_gen)}

    def train_step(self) -> dict[str, float]:
        """One autoencoder step and, once the GAN is on, one discriminator step (each over train.grad_accum parts).

        The adaptive GAN weight λ is computed per micro-step (averaged over processes), so with the GAN on
        grad_accum > 1 is close to, not identical with, one step on the whole batch.
        """
        batch, pairs = self.draw(), []

        def generator_loss(part: Batch) -> tuple[torch.Tensor, dict[str, float]]:
            x = self.images(part)
            with self.autocast():
                recon, posterior = self.train_model(x, sample_posterior=True, noise=part["eps"])
            recon = recon.float()
            pairs.append((x, recon.detach()))
            return self.loss.generator_loss(x, recon, posterior, self.step, self.model.last_layer)

        logs = self.accumulate(batch, generator_loss, self.opt_g)
        self.optimizer_step(self.opt_g, self.opt_g.param_groups[0]["params"], skip=self.check_finite(logs["loss"]))
        logs |= {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}  # same columns before disc_start
        if self.loss.discriminator_active(self.step):
            remaining = iter(pairs)
            logs |= self.accumulate(batch, lambda _: self.loss.discriminator_loss(*next(remaining), self.step),
                                    self.opt_d)
            self.optimizer_step(self.opt_d, self.loss.discriminator_parameters(), skip=self.bad_flag)
        return logs

    def probe_step(self, n: int) -> None:
        """Forward + backward of n random images through the generator loss (train.batch_size=auto); the
        gradients are dropped and every random stream is left as it was."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            size, c = self.cfg.data.image_size, self.cfg.data.channels
            x = torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0)).to(self.device) * 2 - 1
            with self.autocast():
                recon, posterior = self.train_model(x, sample_posterior=True)
            step = getattr(self, "step", 0)  # probed while the trainer is built: before the step counter exists
            self.loss.generator_loss(x, recon.float(), posterior, step, self.model.last_layer)[0].backward()
        self.opt_g.zero_grad(set_to_none=True)

    def schedule_extra(self) -> dict[str, int]:
        """When the GAN starts: a budget's plan stretches it with the run (training/plan.py)."""
        return {"disc_start": self.cfg.ae_loss.disc_start}

    def apply_schedule_extra(self, values: dict[str, int]) -> None:
        """Set the planned GAN start (the loss reads this config)."""
        if "disc_start" in values:
            self.cfg.ae_loss.disc_start = values["disc_start"]

    @torch.no_grad()
    def encode_seconds(self) -> float:
        """What encoding this data set to latents will cost the next stage of a recipe (training/latents.py:
        batches of 64, the mirrored images too with data.hflip), from the fastest of three batches timed: one
        batch caught by a moment of load (a run seen to reserve 299 s instead of ~20) would starve the stage."""
        x = self.data.batch(torch.arange(min(64, len(self.data)))).to(self.device)
        self.model.eval()
        self.model.encode(x)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            self.model.encode(x)
            times.append(time.perf_counter() - t)
        seconds = min(times)
        self.model.train()
        return seconds * math.ceil(len(self.data) / len(x)) * (2 if self.cfg.data.hflip else 1)

    @torch.no_grad()
    def measure_scale(self) -> float:
        """s = 1 / std of the posterior means over up to SCALE_IMAGES training images."""
        self.model.eval()
        n = min(len(self.data), SCALE_IMAGES)
        means = [self.model.encode(self.data.batch(torch.arange(i, min(i + 256, n))).to(self.device)).mean
                 for i in range(0, n, 256)]
        self.model.train()
        return measure_scale_factor(torch.cat(means))

    def export(self) -> None:
        """Write ``autoencoder/`` with the measured scale factor, and the manifest."""
        self.cfg.autoencoder.scale_factor = self.measure_scale()
        self.model.config.scale_factor = self.cfg.autoencoder.scale_factor
        d = self.cfg.data
        manifest = Manifest(image_size=d.image_size, channels=d.channels, kind=FolderKind.AUTOENCODER, step=self.step,
                            scale_factor=self.cfg.autoencoder.scale_factor,
                            class_names=tuple(self.data.class_names or ()),
                            data=DataInfo(d.source, self.data.fingerprint, len(self.data)))
        save_model_folder(self.out, {"autoencoder": (self.cfg.autoencoder.to_dict(), self.model.state_dict())},
                          manifest)

    @torch.no_grad()
    def preview(self) -> Path:
        """Originals (odd rows) above their reconstructions (even rows)."""
        n = min(self.cfg.train.grid_samples, len(self.data), 32)
        x = self.data.batch(torch.arange(n)).to(self.device)
        self.model.eval()
        recon = self.model(x, sample_posterior=False)[0]
        self.model.train()
        cols = min(n, 8)
        rows = [torch.cat([x[i:i + cols], recon[i:i + cols]]) for i in range(0, n, cols)]
        images = to_uint8_image(torch.cat(rows)).cpu()
        path = self.out / "samples" / f"recon_{self.step:08d}.png"
        save_png(make_grid(upscale_nearest(images), nrow=cols), path, {"step": self.step, "kind": "reconstruction"})
        return path


def _trainable(loss: AutoencoderLoss) -> nn.Module:
    """The loss without its frozen perceptual network (fixed weights need no checkpoint)."""
    holder = nn.Module()
    holder.discriminator = loss.discriminator
    holder.logvar = loss.logvar
    return holder
