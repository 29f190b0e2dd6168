"""What every trainer shares: the run folder, data order, RNG, the loop (the state it checkpoints is
serialised by training/checkpoints.py, its metrics log written by training/metrics_log.py).

A trainer subclasses :class:`TrainingRun` and supplies ``build`` (networks and optimisers),
``train_step``, ``export`` (the model folder) and ``preview`` (an image grid). Everything random is
drawn from generators whose state is checkpointed (data order, flips, t and ε, dropout), so
``--resume`` continues exactly: N + N steps with a resume between equal 2N steps straight.

Under ``torchrun`` (training/distributed.py) every process draws the same global batch of ``train.batch_size``
images and the same random numbers, and trains on its own rows in ``train.grad_accum`` micro-steps: the
step equals one process's step on the whole batch. Only rank 0 writes logs, grids, checkpoints and exports.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import yaml
from torch import nn
from tqdm import tqdm

from latentdiff.training.config import RunConfig, TrainConfig
from latentdiff.data import ImageData, load_dataset
from latentdiff.data.transforms import apply_hflip, hflip_coins
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write
from latentdiff.training import distributed
from latentdiff.training.checkpoints import (latest_checkpoint, load_training_state, remove_interrupted_writes,
                                             rng_tensors, save_training_state, split_rng_tensors)
from latentdiff.training.metrics_log import CsvLog

Batch = dict[str, torch.Tensor]  # a global batch: tensors whose first dimension runs over its images


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
        self.dist, self.device = distributed.setup(pick_device(device))
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self._check_out_dir(resume)
        torch.manual_seed(tc.seed)  # weight init (identical on every rank) and dropout
        self.data: ImageData = load_dataset(cfg.data)
        self._check_batch_split()
        self._ddp: list[nn.Module] = []  # DistributedDataParallel wrappers (see parallel())
        self._synced: set[int] = set()  # ids of the parameters whose gradients DDP averages
        self.build()
        if self.dist.rank:  # dropout differs between ranks, as it does between the images of one batch
            torch.manual_seed(tc.seed + 1_000_003 * self.dist.rank)
        # fp16's narrow range needs loss scaling (meant for GPUs; works on the CPU too, where bf16 is the better choice)
        self.scaler = torch.amp.GradScaler(self.device.type) if tc.precision == "fp16" else None
        self.batches = Batches(len(self.data), tc.batch_size, tc.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(tc.seed + 2)  # t and ε of the objective, posterior samples
        self.step, self.bad_steps, self.images_seen = 0, 0, 0
        # the running sums of the logs since the last metrics.csv row, and their count: checkpointed, so a
        # resumed run's next row averages the same steps as an uninterrupted run's
        self.log_sums: dict[str, float] = {}
        self.log_count = 0
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
    def next_indices(self) -> torch.Tensor:
        """Dataset indices of the next global batch (the same on every rank)."""
        idx = self.batches.next()
        self.images_seen += len(idx)
        return idx

    def draw(self) -> Batch:
        """The next global batch: its indices and, with data.hflip, which images are mirrored.

        Trainers add the random numbers of their objective (drawn for the whole global batch, so that
        every rank and every accumulation split draws the same); :meth:`accumulate` hands out the rows.
        """
        idx = self.next_indices()
        return {"idx": idx} | ({"flip": hflip_coins(len(idx), self.batches.generator)} if self.cfg.data.hflip else {})

    def images(self, part: Batch) -> torch.Tensor:
        """The images of (a part of) a batch, in [-1, 1], mirrored where drawn, on the device."""
        x = self.data.batch(part["idx"])
        if "flip" in part:
            x = apply_hflip(x, part["flip"])
        return x.to(self.device)

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` as the training forward calls it: in DDP under torchrun, compiled with train.compile.

        Checkpoints, EMA and exports keep using ``module`` itself (its weights are the same tensors).
        """
        wrapped = distributed.wrap_ddp(module, self.device)
        if wrapped is not module:
            self._ddp.append(wrapped)
            self._synced |= {id(p) for p in module.parameters()}
        return torch.compile(wrapped) if self.cfg.train.compile else wrapped

    def adamw(self, params: Any, **kw: Any) -> torch.optim.AdamW:
        """AdamW, fused into one kernel per step on CPU and CUDA: several times faster than torch's per-tensor
        loop on the many small tensors of a small model (benchmarks/results/train_step.md)."""
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(params, fused=fused, **kw)

    def autocast(self) -> ContextManager:
        """Autocast of the forward for train.precision (bf16 or fp16); nothing for fp32."""
        p = self.cfg.train.precision
        if p == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, torch.bfloat16 if p == "bf16" else torch.float16)

    def accumulate(self, batch: Batch, loss_fn: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]],
                   opt: torch.optim.Optimizer) -> dict[str, float]:
        """Zero ``opt``'s gradients, then forward and backward this rank's rows in train.grad_accum micro-steps.

        Each micro-step's loss (a mean over its rows) is divided by grad_accum and DDP averages over the
        ranks, so the gradients are those of the mean loss over the global batch. Returns the logs of
        ``loss_fn`` averaged over micro-steps and ranks.
        """
        opt.zero_grad(set_to_none=True)
        parts = [{k: v[s] for k, v in batch.items()} for s in
                 distributed.shard(len(batch["idx"]), self.cfg.train.grad_accum, self.dist)]
        sums: dict[str, float] = {}
        for i, part in enumerate(parts):
            with self._no_sync(i < len(parts) - 1):  # DDP averages once, after the last micro-step
                loss, logs = loss_fn(part)
                loss = loss / len(parts)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / len(parts)
        return distributed.mean_logs(sums, self.device)

    def _no_sync(self, skip: bool) -> ContextManager:
        stack = ExitStack()
        if skip:
            for ddp in self._ddp:
                stack.enter_context(ddp.no_sync())
        return stack

    def skip_nonfinite(self, loss: float | torch.Tensor) -> bool:
        """True (and count it) when the loss is NaN/inf; stop with a clear error past the limit.

        Under torchrun pass the loss averaged over ranks (:meth:`accumulate`'s), so that all skip together.
        """
        if math.isfinite(float(loss)):
            return False
        self.bad_steps += 1
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        limit = self.cfg.train.max_bad_steps
        if self.bad_steps > limit:
            raise UserError(f"stopped at step {self.step}: {self.bad_steps} steps had a non-finite loss "
                            f"(limit train.max_bad_steps={limit}); lower train.lr or use train.precision=fp32")
        return True

    def optimizer_step(self, opt: torch.optim.Optimizer, params: Any) -> None:
        """After :meth:`accumulate`: average the gradients DDP does not cover, clip (train.grad_clip), step."""
        params = list(params)
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None and id(p) not in self._synced])
        if self.scaler:
            self.scaler.unscale_(opt)
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if self.scaler:
            self.scaler.step(opt)  # skipped when fp16 gradients overflowed; update() then lowers the scale
        else:
            opt.step()

    def _check_batch_split(self) -> None:
        tc, world = self.cfg.train, self.dist.world_size
        n = min(tc.batch_size, len(self.data))  # a data set smaller than the batch is one batch
        if n % (tc.grad_accum * world):
            raise UserError(f"the global batch of {n} images (train.batch_size={tc.batch_size}, {len(self.data)} images) "
                            f"does not split into {world} process(es) × train.grad_accum={tc.grad_accum}; "
                            f"choose a batch size divisible by {tc.grad_accum * world}")

    def batch_line(self) -> str:
        """'batch 64 = 2 processes × 2 micro-steps × 16': what one optimiser step sees."""
        tc, world = self.cfg.train, self.dist.world_size
        n = min(tc.batch_size, len(self.data))
        if world == 1 and tc.grad_accum == 1:
            return f"batch {n}"
        return (f"global batch {n} = {world} process(es) × {tc.grad_accum} micro-step(s) × "
                f"{n // (world * tc.grad_accum)} images")

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
        rng, state = load_training_state(folder, self.modules(), self.optimizers(), self.fingerprint())
        batches, noise, own = split_rng_tensors(rng, self.dist.rank)
        self.batches.load(batches)
        self.noise_gen.set_state(noise)
        self.step, self.bad_steps, self.images_seen = state["step"], state["bad_steps"], state["images_seen"]
        names, sums = state.get("log_names", []), state.get("log_sums", [])
        if len(names) != len(sums):
            raise UserError(f"{folder / 'state.json'}: log_names and log_sums differ in length")
        self.log_sums, self.log_count = dict(zip(names, sums)), state.get("log_count", 0)
        if own is not None:
            torch.set_rng_state(own)
        else:  # resumed with more processes than were saved: a fresh, still deterministic, dropout stream
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.dist.rank + self.step)
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.load_extra_state(state.get("extra", {}))

    def save(self) -> Path | None:
        """Checkpoint the full training state, then export the model folder (rank 0; every rank must call it)."""
        torch_states = distributed.gather_objects(torch.get_rng_state())  # each rank's dropout stream
        with distributed.main_first(self.dist):  # the others wait until the checkpoint is on disk
            return self._write_checkpoint(torch_states) if self.dist.is_main else None

    def _write_checkpoint(self, torch_states: list[torch.Tensor]) -> Path:
        rng = rng_tensors(self.batches.state(), self.noise_gen.get_state(), torch_states)
        state = {"bad_steps": self.bad_steps, "images_seen": self.images_seen,
                 "log_names": list(self.log_sums), "log_sums": list(self.log_sums.values()),
                 "log_count": self.log_count,
                 "data_fingerprint": self.fingerprint(), "config": self.cfg.to_dict(),
                 "extra": self.extra_state(), "world_size": self.dist.world_size,
                 "grad_scaler": self.scaler.state_dict() if self.scaler else None}
        folder = save_training_state(self.out / "checkpoints", self.step, self.modules(), self.optimizers(), rng,
                                     state, self.cfg.train.keep_checkpoints)
        self.export()
        return folder

    # ---- the loop -----------------------------------------------------------------------------
    def describe(self) -> str:
        """One line on what is being trained."""
        n = sum(p.numel() for p in self.modules()["model"].parameters())
        return f"{self.kind} {n:,} parameters"

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path | None:
        """Train up to ``train.steps``; returns the path of the last preview grid written."""
        tc, main = self.cfg.train, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_interrupted_writes(self.out)  # temporary files of a killed earlier process
            cfg_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
            where = f"{self.device} ({torch.get_num_threads()} threads)"
            if self.dist.active:
                where = f"{self.dist.world_size} processes ({distributed.backend()}), rank 0 on {where}"
            print(f"training on {where}: {len(self.data)} images from {self.cfg.data.source}, {self.describe()}, "
                  f"steps {self.step}→{tc.steps}, {self.batch_line()}, {tc.precision}", file=sys.stderr)
            gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
            if gpus > 1 and not self.dist.active:
                print(f"note: {gpus} GPUs visible, training on one; to use all: torchrun --nproc-per-node {gpus} "
                      "-m latentdiff train ...", file=sys.stderr)
        show = main and (self.progress if self.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=tc.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        grid = None
        for m in self.modules().values():
            m.train()
        logger = CsvLog(self.out / "metrics.csv", self.out / "tensorboard" if tc.tensorboard else None,
                        self.step) if main else None
        t0, seen0 = time.perf_counter(), self.images_seen
        deadline = time.perf_counter() + tc.time_limit * 60 if tc.time_limit else float("inf")
        while self.step < tc.steps:
            if tc.time_limit and distributed.broadcast_flag(time.perf_counter() > deadline, self.device):
                if main:
                    print(f"train.time_limit of {tc.time_limit} min reached at step {self.step}", file=sys.stderr)
                break
            for opt in self.optimizers().values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(self.step, tc)
            logs = self.train_step()
            if logs is None:
                continue
            if self.scaler:
                self.scaler.update()
            self.step += 1
            bar.update(1)
            self.log_count += 1
            for k, v in logs.items():
                self.log_sums[k] = self.log_sums.get(k, 0.0) + v
            if logger and tc.log_every and (self.step % tc.log_every == 0 or self.step == tc.steps):
                rate = (self.images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                means = {k: v / self.log_count for k, v in self.log_sums.items()}
                row = {"step": self.step, **means, "lr": lr_at(self.step - 1, tc), "images_per_s": rate,
                       "bad_steps": self.bad_steps}
                logger.write(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{rate:.0f}")
                if not show:
                    print(f"step {self.step}/{tc.steps} loss {row.get('loss', float('nan')):.4f} {rate:.0f} img/s",
                          file=sys.stderr)
                if on_log:
                    on_log(row)
                t0, seen0, self.log_sums, self.log_count = time.perf_counter(), self.images_seen, {}, 0
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save()
            if main and tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                grid = self.preview()
        bar.close()
        self.save()
        if not main:
            return None
        return (self.preview() if tc.grid_samples else None) or grid

