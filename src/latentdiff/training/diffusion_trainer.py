"""Training the denoiser: data → (20.8) noising → UNet → weighted MSE → AdamW → EMA → checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.data.masks import random_masks
from latentdiff.data.transforms import resize_bicubic
from latentdiff.diffusion import diffusion_loss, draw_t_eps
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import IdentityAutoencoder
from latentdiff.formats.checkpoint import load_into, load_json_object, load_tensors
from latentdiff.models.concat import (ConcatKind, inpaint_concat, low_res_concat, network_differences, widen_input,
                                      with_concat)
from latentdiff.models.conditioning import CondKind, Conditioner, conditioning_kind
from latentdiff.models.folder import Conditioning, DataInfo, Manifest, load_autoencoder, save_model_folder
from latentdiff.models.sampling import GeneratorNoise, LatentSampler
from latentdiff.models.settings import SampleSettings
from latentdiff.models.text_encoder import build_text_encoder
from latentdiff.models.unet import UNet
from latentdiff.training.ema import EMA
from latentdiff.training.latents import LatentData, check_latent_shapes, file_fingerprint
from latentdiff.training.loop import Batch, TrainingRun


CACHE_BYTES = 2 * 2**30  # memory the per-caption text contexts may take; more captions are encoded per batch


class DiffusionTrainer(TrainingRun):
    """Trains a UNet to predict ε, x0 or v; samples and exports its EMA copy."""

    kind = "UNet"
    takes_buckets = True

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
            # every process encodes its share of the parts; all then read the whole cache, memory-mapped
            self.latents = LatentData(self.data, self.autoencoder, ae_fp, ae_dir / "latent_cache", d.hflip,
                                      self.device, dist=self.dist, workers=d.workers)
        else:
            self.autoencoder = IdentityAutoencoder(d.channels)
            check_latent_shapes(d.image_size, None, self.cfg.unet.in_channels, self.cfg.unet.out_channels, d.channels,
                                self.cfg.cond.concat)
        self._check_low_res()
        self._check_buckets()
        self._check_conditioning()
        self.schedule = self.cfg.diffusion.build_schedule()
        self.train_schedule = self.schedule.to(self.device)  # the loss indexes it on the device
        self.model = UNet(self.cfg.unet).to(self.device)
        if tc.init_unet:  # fine-tuning; a resume then loads its own checkpoint over these weights
            self._init_unet(Path(tc.init_unet))
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = self.adamw(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.train_model = self.parallel(self.model)

    def _init_unet(self, folder: Path) -> None:
        """train.init_unet: start from another model's UNet (added input channels at zero weight); a different
        network is an error that names the unet.* settings which would make it the same."""
        path = folder / "unet" / "model.safetensors"
        try:
            load_into(self.model, widen_input(load_tensors(path), self.cfg.unet.in_channels, str(path)), str(path))
        except UserError as e:
            saved = folder / "unet" / "config.json"
            differ = network_differences(load_json_object(saved), self.cfg.unet) if saved.is_file() else []
            if not differ:
                raise
            raise UserError(f"train.init_unet={folder}: its UNet is another network than this run's; add "
                            f"{' '.join(differ)} to train the same network ({e})") from None

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
        """(C, h, w) of what the UNet denoises (at data.image_size; see :meth:`latent_shape_of` for buckets)."""
        f, size = self.autoencoder.downsample_factor, self.cfg.data.image_size
        return (self.autoencoder.latent_channels, size // f, size // f)

    def latent_shape_of(self, idx: torch.Tensor) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a batch of images ``idx`` (one aspect bucket with data.buckets)."""
        if getattr(self.data, "bucket", None) is None:
            return self.latent_shape
        (h, w), f = self.data.size_of(int(idx[0])), self.autoencoder.downsample_factor
        return (self.autoencoder.latent_channels, h // f, w // f)

    def draw(self) -> Batch:
        """The global batch: indices with flips (pixels) or cached latents drawn from q(z|x), the condition's
        dropout coins, inpainting masks, and t and ε of the objective."""
        if self.latents is None:
            batch = super().draw()
        else:
            idx = self.next_indices()
            z, mirrored = self.latents.batch(idx, self.streams.aug, self.cfg.data.hflip,
                                             self.cfg.latent.sample_posterior, return_flips=True)
            # the flips, for concat inputs made from the pixels; "idx" the images encoded (one unreadable when the
            # cache was built is stood in for by another, whose label and caption then go with it)
            batch = {"idx": self.latents.used(idx), "x0": z, "flip": mirrored}
        n, c = len(batch["idx"]), self.cfg.cond
        if self.cond.kind is not CondKind.NONE:
            batch["drop"] = self.drop_coins(n)
        if ConcatKind.of(c.concat) is ConcatKind.INPAINT:
            batch["repaint"] = random_masks(n, self.cfg.data.image_size, self.noise_gen, c.mask_full_prob)
        t, batch["eps"] = draw_t_eps(self.schedule, (n, *self.latent_shape_of(batch["idx"])), self.noise_gen,
                                     self.streams.noise)
        batch["t"] = self.streams.to_device(t)
        return batch

    def _check_low_res(self) -> None:
        """A super-resolution model's low-resolution side must be smaller than the image."""
        c, size = self.cfg.cond, self.cfg.data.image_size
        if ConcatKind.of(c.concat) is ConcatKind.LOW_RES and not c.low_res_size < size:
            raise UserError(f"cond.low_res_size ({c.low_res_size}) must be smaller than data.image_size ({size})")

    def _check_buckets(self) -> None:
        """Every aspect bucket's sides must divide by the autoencoder's factor times the UNet's downsamplings."""
        sizes = self.data.sizes if getattr(self.data, "bucket", None) is not None else []
        if sizes and self.cfg.cond.concat:
            raise UserError(f"data.buckets: not with cond.concat={self.cfg.cond.concat} (its masks and low-resolution "
                            "inputs are square)")
        m = self.autoencoder.downsample_factor * 2 ** (len(self.cfg.unet.channel_mult) - 1)
        bad = [f"{w}x{h}" for h, w in sizes if h % m or w % m]
        if bad:
            raise UserError(f"data.buckets: {', '.join(bad)} must have sides divisible by {m} (the autoencoder's "
                            f"factor times the UNet's downsamplings); set data.bucket_step={m} or list other sizes")

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

    def train_step(self) -> dict[str, torch.Tensor]:
        """One AdamW step on the global batch (skipped on the device when the loss is not finite)."""
        logs = self.accumulate(self.draw(), self.micro_loss, self.opt)
        self.optimizer_step(self.opt, self.model.parameters(), skip=self.check_finite(logs["loss"]))
        self.ema.update(self.model, self.step + 1, skip=self.bad_flag)
        return logs

    def micro_loss(self, part: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        loss = diffusion_loss(model_fn, x0, self.train_schedule, d.prediction, d.weighting, d.min_snr_gamma,
                              d.min_snr_offset, t=part["t"], eps=part["eps"])
        return loss, {"loss": loss.detach()}  # read by the loop every train.log_every steps, not here

    def probe_step(self, n: int) -> None:
        """Forward + backward of n random latents with null conditions (train.batch_size=auto); the
        gradients are dropped and every random stream is left as it was."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(n, *self.latent_shape, generator=g).to(self.device)
            cond = self.cond.null(n)
            extra = self.cfg.unet.in_channels - self.latent_shape[0]
            if extra:
                cond["concat"] = torch.zeros(n, extra, *self.latent_shape[1:], device=self.device)
            unet = with_concat(self.train_model)

            def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with self.autocast():
                    return unet(z_t, t, **cond)

            t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=g).to(self.device)
            d = self.cfg.diffusion
            diffusion_loss(model_fn, x0, self.train_schedule, d.prediction, d.weighting, d.min_snr_gamma,
                           d.min_snr_offset, t=t, eps=torch.randn_like(x0)).backward()
        self.opt.zero_grad(set_to_none=True)

    def preview_seconds(self) -> float:
        """What the final grid will cost: grids of 1 and 2 sampler steps timed (then deleted), extrapolated to
        train.grid_steps (rank 0)."""
        if not self.dist.is_main:
            return 0.0
        tc, steps, times = self.cfg.train, self.cfg.train.grid_steps, []
        try:
            for k in (1, 2):
                tc.grid_steps = k
                t = time.perf_counter()
                self.preview().unlink()
                times.append(time.perf_counter() - t)
        finally:
            tc.grid_steps = steps
        return times[0] + (steps - 1) * max(times[1] - times[0], 0.0)

    def manifest(self) -> Manifest:
        """What a pipeline needs beside the weights."""
        d, c = self.cfg.data, self.cfg.cond
        concat = ConcatKind.of(c.concat)
        return Manifest(image_size=d.image_size, channels=d.channels, step=self.step,
                        diffusion=dataclasses.replace(self.cfg.diffusion), latent_shape=self.latent_shape,
                        conditioning=Conditioning(self.cond.kind, c.guidance, c.guidance_max_t), concat=concat,
                        low_res_size=c.low_res_size if concat is ConcatKind.LOW_RES else None,
                        class_names=tuple(self.data.class_names or ()),
                        data=DataInfo(d.source, self.data.fingerprint, len(self.data)),
                        buckets=tuple((w, h) for h, w in self.data.sizes)  # sample at any with --size WxH
                        if getattr(self.data, "bucket", None) is not None else None)

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
