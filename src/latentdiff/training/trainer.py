"""The diffusion training loop: data → (20.8) noising → UNet → weighted MSE → AdamW → EMA → checkpoints.

Everything random is drawn from generators whose state is checkpointed (data order, t and ε, dropout),
so ``--resume`` continues exactly: N + N steps with a resume between equal 2N steps straight.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm import tqdm

from latentdiff.config import RunConfig
from latentdiff.data import ImageData, load_dataset, random_hflip
from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.diffusion import as_eps_fn, diffusion_loss, sample
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write, flatten_optimizer, load_into, unflatten_optimizer
from latentdiff.models.folder import save_model_folder
from latentdiff.models.unet import UNet
from latentdiff.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from latentdiff.training.ema import EMA


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up to ``lr``, then constant or cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


class Batches:
    """Shuffled epochs over an in-memory dataset; its position is part of the checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch (a batch never straddles two epochs)."""
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos: self.pos + min(self.batch_size, self.n)]
        self.pos += len(idx)
        return idx

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the exact position."""
        return {"perm": self.perm, "pos": torch.tensor(self.pos), "generator": self.generator.get_state()}

    def load(self, s: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.perm, self.pos = s["perm"], int(s["pos"])
        self.generator.set_state(s["generator"])


class Trainer:
    """One training run in one folder: build, optionally resume, loop, checkpoint, export."""

    def __init__(self, cfg: RunConfig, out_dir: Path | str, resume: bool = False,
                 device: str = "auto", progress: bool | None = None) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = pick_device(device)
        self.progress = progress
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self._check_out_dir(resume)
        torch.manual_seed(tc.seed)  # weight init and dropout
        self.data: ImageData = load_dataset(cfg.data)
        self._check_shapes()
        self.schedule = cfg.diffusion.build_schedule()
        self.model = UNet(cfg.unet).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.batches = Batches(len(self.data), tc.batch_size, tc.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(tc.seed + 2)
        self.step, self.bad_steps, self.images_seen = 0, 0, 0
        if resume:
            self._resume()

    # ---- set-up checks ------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> None:
        ckpts = self.out / "checkpoints"
        if resume:
            if latest_checkpoint(ckpts) is None:
                raise UserError(f"--resume: {self.out} holds no checkpoint to resume from")
        elif latest_checkpoint(ckpts) is not None:
            raise UserError(f"{self.out} already holds a training run; pass --resume to continue it "
                            "or choose another --out")

    def _check_shapes(self) -> None:
        u, d = self.cfg.unet, self.cfg.data
        if u.in_channels != d.channels or u.out_channels != d.channels:
            raise UserError(f"unet.in_channels/out_channels ({u.in_channels}/{u.out_channels}) must equal "
                            f"data.channels ({d.channels}) for pixel-space diffusion")
        if u.num_classes is not None and self.data.labels is None:
            raise UserError(f"unet.num_classes={u.num_classes} but the data set {d.source!r} has no class labels")
        if u.num_classes is not None and int(self.data.labels.max()) >= u.num_classes:
            raise UserError(f"unet.num_classes={u.num_classes} but the data has {int(self.data.labels.max()) + 1} classes")

    # ---- checkpoints --------------------------------------------------------------------------
    def _resume(self) -> None:
        folder = latest_checkpoint(self.out / "checkpoints")
        groups, state = load_checkpoint(folder, ["model", "ema", "optimizer", "rng"])
        if state.get("data_fingerprint") != self.data.fingerprint:
            raise UserError(f"{folder}: the data set changed since this checkpoint was written "
                            "(fingerprint differs); start a new run with another --out")
        load_into(self.model, groups["model"], str(folder / "model.safetensors"))
        load_into(self.ema.model, groups["ema"], str(folder / "ema.safetensors"))
        self.opt.load_state_dict(unflatten_optimizer(groups["optimizer"], state["optimizer"]))
        rng = groups["rng"]
        self.batches.load({k[len("batches."):]: v for k, v in rng.items() if k.startswith("batches.")})
        self.noise_gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        self.step, self.bad_steps, self.images_seen = state["step"], state["bad_steps"], state["images_seen"]

    def save(self) -> Path:
        """Checkpoint the full training state, then export the EMA model folder."""
        opt_tensors, opt_meta = flatten_optimizer(self.opt.state_dict())
        rng = {f"batches.{k}": v for k, v in self.batches.state().items()}
        rng |= {"noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        state = {"optimizer": opt_meta, "bad_steps": self.bad_steps, "images_seen": self.images_seen,
                 "data_fingerprint": self.data.fingerprint, "config": self.cfg.to_dict()}
        folder = save_checkpoint(self.out / "checkpoints", self.step,
                                 {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                                  "optimizer": opt_tensors, "rng": rng}, state, self.cfg.train.keep_checkpoints)
        save_model_folder(self.out, self.ema.model, self.cfg.unet, self.manifest())
        return folder

    def manifest(self) -> dict[str, Any]:
        """What a pipeline needs beside the weights."""
        d = self.cfg.data
        return {"step": self.step, "diffusion": dataclasses.asdict(self.cfg.diffusion),
                "image_size": d.image_size, "channels": d.channels, "class_names": self.data.class_names,
                "data": {"source": d.source, "fingerprint": self.data.fingerprint, "images": len(self.data)}}

    # ---- the loop -----------------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimiser step; returns the loss, or None when the step was skipped as non-finite."""
        tc, u = self.cfg.train, self.cfg.unet
        idx = self.batches.next()
        x0 = self.data.batch(idx)
        if self.cfg.data.hflip:
            x0 = random_hflip(x0, self.batches.generator)
        x0 = x0.to(self.device)
        labels = None
        if u.num_classes is not None:
            labels = self.data.labels[idx].to(self.device)

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            autocast = torch.autocast(self.device.type, torch.bfloat16) if tc.bf16 else nullcontext()
            with autocast:
                return self.model(z_t, t, class_labels=labels)

        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, tc)
        loss = diffusion_loss(model_fn, x0, self.schedule, self.cfg.diffusion.prediction,
                              self.cfg.diffusion.weighting, self.cfg.diffusion.min_snr_gamma, self.noise_gen)
        self.images_seen += x0.shape[0]
        if not torch.isfinite(loss):
            self.bad_steps += 1
            self.opt.zero_grad(set_to_none=True)
            if self.bad_steps > tc.max_bad_steps:
                raise UserError(f"stopped at step {self.step}: {self.bad_steps} steps had a non-finite loss "
                                f"(limit train.max_bad_steps={tc.max_bad_steps}); lower train.lr or disable bf16")
            return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return float(loss.detach())

    def sample_grid(self) -> Path:
        """Sample a grid from the EMA model with a fixed seed, so grids over training are comparable."""
        tc = self.cfg.train
        n, d = tc.grid_samples, self.cfg.data
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

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path | None:
        """Train up to ``train.steps``; returns the path of the last sample grid written."""
        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
        print(f"training on {self.device} ({torch.get_num_threads()} threads): {len(self.data)} images "
              f"from {self.cfg.data.source}, UNet {sum(p.numel() for p in self.model.parameters()):,} parameters, "
              f"steps {self.step}→{tc.steps}, batch {tc.batch_size}", file=sys.stderr)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        log_path, grid = self.out / "metrics.csv", None
        new_log = not log_path.exists()
        self.model.train()
        with open(log_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_log:
                writer.writerow(["step", "loss", "lr", "images_per_s", "bad_steps"])
            t0, seen0, losses = time.perf_counter(), self.images_seen, []
            while self.step < tc.steps:
                loss = self.train_step()
                if loss is None:
                    continue
                losses.append(loss)
                bar.update(1)
                if tc.log_every and (self.step % tc.log_every == 0 or self.step == tc.steps):
                    rate = (self.images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                    row = {"step": self.step, "loss": sum(losses) / len(losses), "lr": lr_at(self.step - 1, tc),
                           "images_per_s": rate, "bad_steps": self.bad_steps}
                    writer.writerow([row[k] for k in ("step", "loss", "lr", "images_per_s", "bad_steps")])
                    f.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
                    if not show:
                        print(f"step {self.step}/{tc.steps} loss {row['loss']:.4f} {rate:.0f} img/s", file=sys.stderr)
                    if on_log:
                        on_log(row)
                    t0, seen0, losses = time.perf_counter(), self.images_seen, []
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    grid = self.sample_grid()
        bar.close()
        self.save()
        return self.sample_grid() if tc.grid_samples else grid
