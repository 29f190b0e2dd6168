"""Training the denoiser: data → (20.8) noising → UNet → weighted MSE → AdamW → EMA → checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.data.masks import random_masks
from latentdiff.data.transforms import resize_bicubic
from latentdiff.diffusion import diffusion_loss, draw_t_eps
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import IdentityAutoencoder
from latentdiff.formats.checkpoint import load_into, load_tensors
from latentdiff.models.concat import ConcatKind, inpaint_concat, low_res_concat, widen_input, with_concat
from latentdiff.models.conditioning import CondKind, Conditioner, conditioning_kind
from latentdiff.models.folder import Conditioning, DataInfo, Manifest, load_autoencoder, save_model_folder
from latentdiff.models.sampling import GeneratorNoise, LatentSampler
from latentdiff.models.settings import SampleSettings
from latentdiff.models.text_encoder import build_text_encoder
from latentdiff.models.unet import UNet
from latentdiff.training.ema import EMA
from latentdiff.training.latents import LatentData, check_latent_shapes, file_fingerprint
from latentdiff.training import distributed
from latentdiff.training.loop import Batch, TrainingRun


CACHE_BYTES = 2 * 2**30  # memory the per-caption text contexts may take; more captions are encoded per batch


class DiffusionTrainer(TrainingRun):
    """Trains a UNet to predict ε, x0 or v; samples and exports its EMA copy."""

    kind = "UNet"

    def build(self) -> None:
        """Autoencoder (or identity) and latent cache, UNet, its EMA copy, AdamW and the noise schedule."""
        tc, d, lc = self.cfg.train, self.cfg.data, self.cfg.latent
        self.latents: LatentData | None = None
        if lc.autoencoder:
            ae_dir = Path(lc.autoencoder)
            self.autoencoder = load_autoencoder(ae_dir, self.device)
            check_latent_shapes(d.image_size, self.autoencoder, self.cfg.unet.in_channels,
                                self.cfg.unet.out_channels, d.channels, self.cfg.cond.concat)
            ae_fp = file_fingerprint(ae_dir / "autoencoder" / "model.safetensors")
            with distributed.main_first(self.dist):  # rank 0 encodes and writes the cache, the others read it
                self.latents = LatentData(self.data, self.autoencoder, ae_fp, ae_dir / "latent_cache", d.hflip,
                                          self.device)
        else:
            self.autoencoder = IdentityAutoencoder(d.channels)
            check_latent_shapes(d.image_size, None, self.cfg.unet.in_channels, self.cfg.unet.out_channels, d.channels,
                                self.cfg.cond.concat)
        self._check_low_res()
        self._check_conditioning()
        self.schedule = self.cfg.diffusion.build_schedule()
        self.model = UNet(self.cfg.unet).to(self.device)
        if tc.init_unet:  # fine-tuning; a resume then loads its own checkpoint over these weights
            path = Path(tc.init_unet) / "unet" / "model.safetensors"
            load_into(self.model, widen_input(load_tensors(path), self.cfg.unet.in_channels, str(path)), str(path))
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = self.adamw(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.train_model = self.parallel(self.model)

    def modules(self) -> dict[str, nn.Module]:
        """The trained UNet and its EMA copy."""
        return {"model": self.model, "ema": self.ema.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW."""
        return {"model": self.opt}

    def fingerprint(self) -> str:
        """Data and autoencoder together: either changing invalidates a resume."""
        return self.latents.fingerprint if self.latents is not None else self.data.fingerprint

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises."""
        f, size = self.autoencoder.downsample_factor, self.cfg.data.image_size
        return (self.autoencoder.latent_channels, size // f, size // f)

    def draw(self) -> Batch:
        """The global batch: indices with flips (pixels) or cached latents drawn from q(z|x), the condition's
        dropout coins, inpainting masks, and t and ε of the objective."""
        if self.latents is None:
            batch = super().draw()
        else:
            idx = self.next_indices()
            z, mirrored = self.latents.batch(idx, self.batches.generator, self.cfg.data.hflip,
                                             self.cfg.latent.sample_posterior, return_flips=True)
            batch = {"idx": idx, "x0": z, "flip": mirrored}  # the flips, for concat inputs made from the pixels
        n, c = len(batch["idx"]), self.cfg.cond
        if self.cond.kind is not CondKind.NONE:
            batch["drop"] = self.drop_coins(n)
        if ConcatKind.of(c.concat) is ConcatKind.INPAINT:
            batch["repaint"] = random_masks(n, self.cfg.data.image_size, self.noise_gen, c.mask_full_prob)
        batch["t"], batch["eps"] = draw_t_eps(self.schedule, (n, *self.latent_shape), self.noise_gen)
        return batch

    def _check_low_res(self) -> None:
        """A super-resolution model's low-resolution side must be smaller than the image."""
        c, size = self.cfg.cond, self.cfg.data.image_size
        if ConcatKind.of(c.concat) is ConcatKind.LOW_RES and not c.low_res_size < size:
            raise UserError(f"cond.low_res_size ({c.low_res_size}) must be smaller than data.image_size ({size})")

    def concat_inputs(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      repaint: torch.Tensor | None = None) -> torch.Tensor:
        """The channels concatenated to z_t for these images (in [-1, 1]): a mask (``repaint``, else drawn on
        ``generator``) and the masked image's latent (inpainting), or the image downsampled to low_res_size
        and resized to the UNet's grid."""
        c = self.cfg.cond
        if ConcatKind.of(c.concat) is ConcatKind.INPAINT:
            if repaint is None:
                repaint = random_masks(len(images), images.shape[-1], generator, c.mask_full_prob)
            return inpaint_concat(self.autoencoder, images, repaint.to(images.device))
        return low_res_concat(resize_bicubic(images, c.low_res_size), self.latent_shape[-1])

    def _check_conditioning(self) -> None:
        """Labels for a class-conditional UNet, captions and a text encoder for a text-conditional one."""
        u, d = self.cfg.unet, self.cfg.data
        kind = conditioning_kind(u)
        text_encoder = None
        if kind is CondKind.CLASS:
            if self.data.labels is None:
                raise UserError(f"unet.num_classes={u.num_classes} but the data set {d.source!r} has no class labels")
            if int(self.data.labels.max()) >= u.num_classes:
                raise UserError(f"unet.num_classes={u.num_classes} but the data has "
                                f"{int(self.data.labels.max()) + 1} classes")
        if kind is CondKind.TEXT:
            if not self.data.captions:
                raise UserError(f"unet.context_dim is set but the data set {d.source!r} has no captions "
                                "(use a captioned source: shapes, emoji, or a folder with metadata.jsonl / .txt files)")
            c = self.cfg.cond
            text_encoder = build_text_encoder(c.text_encoder, c.context_length, self.device)
        # a frozen encoder's contexts are cached per caption, unless that would not fit in CACHE_BYTES
        cache = kind is CondKind.TEXT and (len(set(self.data.captions)) * text_encoder.context_length
                                    * text_encoder.width * 4 <= CACHE_BYTES)
        self.cond = Conditioner(u, text_encoder, self.device, cache=cache)

    def drop_coins(self, n: int) -> torch.Tensor:
        """Which of n conditions classifier-free-guidance training replaces by the null one (bool (n,))."""
        return torch.rand(n, generator=self.noise_gen) < self.cfg.cond.drop_prob

    def condition(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The labels or captions of images ``idx``, those where ``drop`` (default: fresh coins) replaced by null."""
        if self.cond.kind is CondKind.NONE:
            return {}
        drop = self.drop_coins(len(idx)) if drop is None else drop
        labels = self.data.labels[idx] if self.cond.kind is CondKind.CLASS else None
        captions = [self.data.captions[i] for i in idx.tolist()] if self.cond.kind is CondKind.TEXT else None
        return self.cond.dropped(labels, captions, drop)

    def train_step(self) -> dict[str, float] | None:
        """One AdamW step on the global batch; skipped (None) when the loss is not finite."""
        logs = self.accumulate(self.draw(), self.micro_loss, self.opt)
        if self.skip_nonfinite(logs["loss"]):
            return None
        self.optimizer_step(self.opt, self.model.parameters())
        self.ema.update(self.model, self.step + 1)
        return logs

    def micro_loss(self, part: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The diffusion loss of some rows of the batch, with the t and ε drawn for them in :meth:`draw`."""
        concat = self.cfg.cond.concat
        images = self.images(part) if self.latents is None or concat else None
        x0 = part["x0"].to(self.device) if "x0" in part else images
        cond = self.condition(part["idx"], part.get("drop"))
        if concat:
            cond["concat"] = self.concat_inputs(images, repaint=part.get("repaint"))
        unet = with_concat(self.train_model)

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return unet(z_t, t, **cond)

        d = self.cfg.diffusion
        loss = diffusion_loss(model_fn, x0, self.schedule, d.prediction, d.weighting, d.min_snr_gamma,
                              d.min_snr_offset, t=part["t"], eps=part["eps"])
        return loss, {"loss": float(loss.detach())}

    def manifest(self) -> Manifest:
        """What a pipeline needs beside the weights."""
        d, c = self.cfg.data, self.cfg.cond
        concat = ConcatKind.of(c.concat)
        return Manifest(image_size=d.image_size, channels=d.channels, step=self.step,
                        diffusion=dataclasses.replace(self.cfg.diffusion), latent_shape=self.latent_shape,
                        conditioning=Conditioning(self.cond.kind, c.guidance, c.guidance_max_t), concat=concat,
                        low_res_size=c.low_res_size if concat is ConcatKind.LOW_RES else None,
                        class_names=tuple(self.data.class_names or ()),
                        data=DataInfo(d.source, self.data.fingerprint, len(self.data)))

    def export(self) -> None:
        """The model folder holds the EMA UNet and, for latent diffusion, a copy of the autoencoder."""
        components = {"unet": (self.cfg.unet.to_dict(), self.ema.model.state_dict())}
        if self.latents is not None:
            components["autoencoder"] = (self.autoencoder.config.to_dict(), self.autoencoder.state_dict())
        savers = {"text_encoder": self.cond.text_encoder.save} if self.cond.kind is CondKind.TEXT else {}
        save_model_folder(self.out, components, self.manifest(), savers)

    @torch.no_grad()
    def preview(self) -> Path:
        """Sample a grid from the EMA model with a fixed seed, so grids over training are comparable."""
        tc, c = self.cfg.train, self.cfg.cond
        n = tc.grid_samples
        g = torch.Generator().manual_seed(tc.seed)
        kind = self.cond.kind
        settings = SampleSettings(n, n, tc.grid_steps, tc.grid_sampler, tc.seed)
        if kind is CondKind.CLASS:  # each row of the grid: one class
            settings = settings.replace(class_label=tuple(i % self.cfg.unet.num_classes for i in range(n)))
        elif kind is CondKind.TEXT:  # the first captions of the data, always the same ones
            settings = settings.replace(prompt=tuple(self.preview_prompts(n)))
        concat = None
        if c.concat:  # the first n images of the data, masks / low-res from the grid's seed
            images = self.data.batch(torch.arange(n) % len(self.data)).to(self.device)
            concat = self.concat_inputs(images, g)
        core = LatentSampler(self.ema.model, self.autoencoder, self.cond, self.cfg.diffusion, self.cfg.data.image_size,
                             guidance=c.guidance, guidance_max_t=c.guidance_max_t)
        images = core.decode(core.sample_latents(settings, GeneratorNoise(g), concat=concat).z)
        path = self.out / "samples" / f"step_{self.step:08d}.png"
        meta = {"step": self.step, "sampler": tc.grid_sampler, "steps": tc.grid_steps, "seed": tc.seed}
        if kind is CondKind.TEXT:
            meta["prompts"] = list(settings.prompt)
        if kind is not CondKind.NONE:
            meta["guidance"] = c.guidance
        if c.concat:
            meta["concat"] = c.concat
        save_png(make_grid(upscale_nearest(images)), path, meta)
        return path

    def preview_prompts(self, n: int) -> list[str]:
        """n captions for the grid: distinct captions of the data in their order, repeated if too few."""
        distinct = list(dict.fromkeys(self.data.captions))[:n]
        return [distinct[i % len(distinct)] for i in range(n)]
