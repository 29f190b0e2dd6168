"""What every trainer shares: the run folder, data order, RNG, checkpoints, the loop, logs.

A trainer subclasses :class:`TrainingRun` and supplies ``build`` (networks and optimisers),
``train_step``, ``export`` (the model folder) and ``preview`` (an image grid). Everything random is
drawn from generators whose state is checkpointed (data order, flips, t and ε, dropout), so
``--resume`` continues exactly: N + N steps with a resume between equal 2N steps straight.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

from latentdiff.config import RunConfig, TrainConfig
from latentdiff.data import ImageData, load_dataset, random_hflip
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write, flatten_optimizer, load_into, unflatten_optimizer
from latentdiff.training.checkpoints import latest_checkpoint, load_checkpoint, remove_interrupted_writes, save_checkpoint


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (try auto, cpu, cuda, cuda:1)") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
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


class TrainingRun:
    """One training run in one folder: build, optionally resume, loop, checkpoint, export."""

    kind = "model"  # what is trained, for messages

    def __init__(self, cfg: RunConfig, out_dir: Path | str, resume: bool = False,
                 device: str = "auto", progress: bool | None = None) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.device = pick_device(device)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self._check_out_dir(resume)
        torch.manual_seed(tc.seed)  # weight init and dropout
        self.data: ImageData = load_dataset(cfg.data)
        self.build()
        self.batches = Batches(len(self.data), tc.batch_size, tc.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(tc.seed + 2)  # t and ε of the objective, posterior samples
        self.step, self.bad_steps, self.images_seen = 0, 0, 0
        if resume:
            self._resume()

    # ---- what a trainer supplies -------------------------------------------------------------
    def build(self) -> None:
        """Create networks and optimisers (after the data is loaded)."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Networks whose weights go into every checkpoint, by name."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers whose state goes into every checkpoint, by name."""
        raise NotImplementedError

    def train_step(self) -> dict[str, float] | None:
        """One optimisation step; the logs, or None when it was skipped (see :meth:`skip_nonfinite`)."""
        raise NotImplementedError

    def export(self) -> None:
        """Write the model folder that pipelines load."""
        raise NotImplementedError

    def preview(self) -> Path | None:
        """Write an image grid that shows progress; return its path."""
        return None

    def fingerprint(self) -> str:
        """What the checkpoint's data must match to resume (the data set's fingerprint by default)."""
        return self.data.fingerprint

    def extra_state(self) -> dict[str, Any]:
        """JSON-safe state beyond weights and optimisers (saved in state.json)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ---- helpers for train_step ---------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch in [-1, 1] on the device, its dataset indices), with random flips if configured."""
        idx = self.batches.next()
        x = self.data.batch(idx)
        if self.cfg.data.hflip:
            x = random_hflip(x, self.batches.generator)
        self.images_seen += x.shape[0]
        return x.to(self.device), idx

    def skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """True (and count it) when the loss is NaN/inf; stop with a clear error past the limit."""
        if bool(torch.isfinite(loss)):
            return False
        self.bad_steps += 1
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        limit = self.cfg.train.max_bad_steps
        if self.bad_steps > limit:
            raise UserError(f"stopped at step {self.step}: {self.bad_steps} steps had a non-finite loss "
                            f"(limit train.max_bad_steps={limit}); lower train.lr or disable train.bf16")
        return True

    def clip_and_step(self, opt: torch.optim.Optimizer, params: Any, loss: torch.Tensor) -> None:
        """zero_grad, backward, clip the global gradient norm (train.grad_clip), step."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        opt.step()

    # ---- checkpoints --------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> None:
        ckpts = self.out / "checkpoints"
        if resume:
            if latest_checkpoint(ckpts) is None:
                raise UserError(f"--resume: {self.out} holds no checkpoint to resume from")
        elif latest_checkpoint(ckpts) is not None:
            raise UserError(f"{self.out} already holds a training run; pass --resume to continue it "
                            "or choose another --out")

    def _resume(self) -> None:
        folder = latest_checkpoint(self.out / "checkpoints")
        names = list(self.modules()) + [f"opt_{k}" for k in self.optimizers()] + ["rng"]
        groups, state = load_checkpoint(folder, names)
        if state.get("data_fingerprint") != self.fingerprint():
            raise UserError(f"{folder}: the data set changed since this checkpoint was written "
                            "(fingerprint differs); start a new run with another --out")
        for name, module in self.modules().items():
            load_into(module, groups[name], str(folder / f"{name}.safetensors"))
        for name, opt in self.optimizers().items():
            opt.load_state_dict(unflatten_optimizer(groups[f"opt_{name}"], state["optimizers"][name]))
        rng = groups["rng"]
        self.batches.load({k[len("batches."):]: v for k, v in rng.items() if k.startswith("batches.")})
        self.noise_gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        self.step, self.bad_steps, self.images_seen = state["step"], state["bad_steps"], state["images_seen"]
        self.load_extra_state(state.get("extra", {}))

    def save(self) -> Path:
        """Checkpoint the full training state, then export the model folder."""
        groups: dict[str, dict[str, torch.Tensor]] = {k: m.state_dict() for k, m in self.modules().items()}
        opt_meta = {}
        for name, opt in self.optimizers().items():
            groups[f"opt_{name}"], opt_meta[name] = flatten_optimizer(opt.state_dict())
        rng = {f"batches.{k}": v for k, v in self.batches.state().items()}
        groups["rng"] = rng | {"noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        state = {"optimizers": opt_meta, "bad_steps": self.bad_steps, "images_seen": self.images_seen,
                 "data_fingerprint": self.fingerprint(), "config": self.cfg.to_dict(),
                 "extra": self.extra_state()}
        folder = save_checkpoint(self.out / "checkpoints", self.step, groups, state, self.cfg.train.keep_checkpoints)
        self.export()
        return folder

    # ---- the loop -----------------------------------------------------------------------------
    def describe(self) -> str:
        """One line on what is being trained."""
        n = sum(p.numel() for p in self.modules()["model"].parameters())
        return f"{self.kind} {n:,} parameters"

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path | None:
        """Train up to ``train.steps``; returns the path of the last preview grid written."""
        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(self.out)  # temporary files of a killed earlier process
        cfg_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
        print(f"training on {self.device} ({torch.get_num_threads()} threads): {len(self.data)} images from "
              f"{self.cfg.data.source}, {self.describe()}, steps {self.step}→{tc.steps}, batch {tc.batch_size}",
              file=sys.stderr)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        grid = None
        for m in self.modules().values():
            m.train()
        logger = CsvLog(self.out / "metrics.csv", self.out / "tensorboard" if tc.tensorboard else None,
                        self.step)
        t0, seen0, sums, count = time.perf_counter(), self.images_seen, {}, 0
        deadline = time.perf_counter() + tc.time_limit * 60 if tc.time_limit else float("inf")
        while self.step < tc.steps:
            if time.perf_counter() > deadline:
                print(f"train.time_limit of {tc.time_limit} min reached at step {self.step}", file=sys.stderr)
                break
            for opt in self.optimizers().values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(self.step, tc)
            logs = self.train_step()
            if logs is None:
                continue
            self.step += 1
            bar.update(1)
            count += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if tc.log_every and (self.step % tc.log_every == 0 or self.step == tc.steps):
                rate = (self.images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                row = {"step": self.step, **{k: v / count for k, v in sums.items()}, "lr": lr_at(self.step - 1, tc),
                       "images_per_s": rate, "bad_steps": self.bad_steps}
                logger.write(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{rate:.0f}")
                if not show:
                    print(f"step {self.step}/{tc.steps} loss {row.get('loss', float('nan')):.4f} {rate:.0f} img/s",
                          file=sys.stderr)
                if on_log:
                    on_log(row)
                t0, seen0, sums, count = time.perf_counter(), self.images_seen, {}, 0
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save()
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                grid = self.preview()
        bar.close()
        self.save()
        return (self.preview() if tc.grid_samples else None) or grid


def _write_csv(path: Path | str, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


class CsvLog:
    """metrics.csv: one row per log interval (header fixed by the first row); optionally TensorBoard too."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, step: int = 0) -> None:
        self.path = path
        self.columns: list[str] | None = None
        # Rows past `step` (the checkpoint this run starts from) were logged by a killed process and will
        # be logged again: drop them, and a row the kill cut short.
        if path.exists() and not step:
            path.unlink()
        elif path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            self.columns = rows[0] if rows else None
            keep = [r for r in rows[1:] if len(r) == len(self.columns) and int(r[0]) <= step]
            if rows and len(keep) + 1 != len(rows):
                atomic_write(path, lambda tmp: _write_csv(tmp, [self.columns, *keep]))
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard=true needs TensorBoard: pip install 'latentdiff[tensorboard]'") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict[str, Any]) -> None:
        """Append a row (and the header first, for a new file)."""
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if self.columns is None:
                self.columns = list(row)
                writer.writerow(self.columns)
            writer.writerow([row.get(k, "") for k in self.columns])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()
