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
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

from latentdiff.training.config import RunConfig, TrainConfig
from latentdiff.data import ImageData, StreamedImages, open_dataset
from latentdiff.data.transforms import apply_hflip, hflip_coins
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write
from latentdiff.training import distributed
from latentdiff.training.batches import Batches, DeviceStreams, StreamedBatch
from latentdiff.training.checkpoints import (latest_checkpoint, load_training_state, remove_interrupted_writes,
                                             rng_tensors, save_training_state, split_rng_tensors)
from latentdiff.training.metrics_log import CsvLog, LogWindow
from latentdiff.training.budget_run import BudgetedRun
from latentdiff.training.step import Batch, StepHelpers



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


class TrainingRun(StepHelpers, BudgetedRun):
    """One training run in one folder: build, optionally resume, loop, checkpoint, export."""

    kind = "model"  # what is trained, for messages
    takes_buckets = False  # whether batches of several image sizes (data.buckets) can be trained

    def __init__(self, cfg: RunConfig, out_dir: Path | str, resume: bool = False,
                 device: str = "auto", progress: bool | None = None, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started  # a time budget counts from here
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.dist, self.device = distributed.setup(pick_device(device))
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self._check_out_dir(resume)
        torch.manual_seed(tc.seed)  # weight init (identical on every rank) and dropout
        # in memory, or streamed from disk (data.stream; buckets of fewer than one batch merge into others)
        min_bucket = tc.lr_batch if tc.batch_size == "auto" else tc.batch_size
        self.data: ImageData | StreamedImages = open_dataset(cfg.data, min_bucket=min_bucket)
        self._drawn: torch.Tensor | None = None  # the global batch drawn last (streamed data fetches it)
        self._streamed: StreamedBatch | None = None  # started at the first streamed images() call
        if tc.batch_size != "auto":
            self._check_batch_split()
        if cfg.data.buckets is not None and not self.takes_buckets:
            raise UserError(f"data.buckets: {self.kind} training takes one image size; buckets are for diffusion")
        self._ddp: list[nn.Module] = []  # DistributedDataParallel wrappers (see parallel())
        self._synced: set[int] = set()  # ids of the parameters whose gradients DDP averages
        self.build()
        if tc.batch_size == "auto":  # needs the networks; before the data order, which depends on the batch
            self._choose_batch()
            self._check_batch_split()
        if self.dist.rank:  # dropout differs between ranks, as it does between the images of one batch
            torch.manual_seed(tc.seed + 1_000_003 * self.dist.rank)
        # fp16's narrow range needs loss scaling (meant for GPUs; works on the CPU too, where bf16 is the better choice)
        self.scaler = torch.amp.GradScaler(self.device.type) if tc.precision == "fp16" else None
        buckets = self.data.bucket if isinstance(self.data, StreamedImages) else None
        self.batches = Batches(len(self.data), tc.batch_size, tc.seed + 1, buckets)
        self.noise_gen = torch.Generator().manual_seed(tc.seed + 2)  # t and ε of the objective, posterior samples
        self.streams = DeviceStreams(self.data, self.device, self.noise_gen, self.batches.generator, tc.seed)
        self.step, self.bad_steps, self.images_seen = 0, 0, 0
        self.bad_flag: torch.Tensor | None = None  # the last step's non-finite flag (check_finite)
        # a time budget (training/plan.py): this process's deadline, a cap on the steps, whether too small is an error
        self.deadline = self.started + 60 * tc.time_budget if tc.time_budget else None
        self.max_steps: int | None = None
        self.strict_budget = True
        self._plan_state: dict[str, Any] | None = None  # the plan of the checkpoint resumed from
        # the logs since the last metrics.csv row: checkpointed, so a resumed run's next row averages the same
        # steps as an uninterrupted run's
        self.window = LogWindow(1)
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
        """One optimisation step; its logs (floats, or 0-d tensors the loop reads only when it writes a row).

        A step whose loss is not finite is skipped on the device (:meth:`check_finite`, :meth:`optimizer_step`)."""
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
        self._drawn = idx
        return idx

    def draw(self) -> Batch:
        """The next global batch: its indices and, with data.hflip, which images are mirrored.

        Trainers add the random numbers of their objective (drawn for the whole global batch, so that
        every rank and every accumulation split draws the same); :meth:`accumulate` hands out the rows.
        """
        idx = self.next_indices()
        return {"idx": idx} | ({"flip": hflip_coins(len(idx), self.batches.generator)} if self.cfg.data.hflip else {})

    def images(self, part: Batch) -> torch.Tensor:
        """The images of (a part of) a batch, in [-1, 1], mirrored where drawn, on the device.

        Streamed data is decoded ahead by data.workers processes; an unreadable image is replaced by the next
        readable one (data.on_bad_file=skip) and ``part["idx"]`` then names it, so its label and caption follow.
        """
        if isinstance(self.data, StreamedImages):
            if self._streamed is None:
                self._streamed = StreamedBatch(self.data, self.cfg.data.workers, self.own_rows)
            x, part["idx"] = self._streamed.images(part["idx"], self._drawn, self.batches)
            x = self.streams.to_device(x)
        else:
            x = self.streams.batch(part["idx"])
        if "flip" in part:
            x = apply_hflip(x, self.streams.to_device(part["flip"]))
        return x

    def own_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch: its slice of every micro-step, in order."""
        return torch.cat([idx[s] for s in distributed.shard(len(idx), self.cfg.train.grad_accum, self.dist)])

    def close_streams(self) -> None:
        """Stop the processes that decode streamed images (started again when needed)."""
        if self._streamed is not None:
            self._streamed.close()
            self._streamed = None

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` as the training forward calls it: in DDP under torchrun, compiled with train.compile.

        Checkpoints, EMA and exports keep using ``module`` itself (its weights are the same tensors).
        """
        wrapped = distributed.wrap_ddp(module, self.device)
        if wrapped is not module:
            self._ddp.append(wrapped)
            self._synced |= {id(p) for p in module.parameters()}
        return torch.compile(wrapped) if self.cfg.train.compile else wrapped

    def _check_batch_split(self) -> None:
        tc, world = self.cfg.train, self.dist.world_size
        n = min(tc.batch_size, len(self.data))  # a data set smaller than the batch is one batch
        if n % (tc.grad_accum * world):
            raise UserError(f"the global batch of {n} images (train.batch_size={tc.batch_size}, "
                            f"{len(self.data)} images) does not split into {world} process(es) × "
                            f"train.grad_accum={tc.grad_accum}; "
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
        self.streams.load(rng)
        self.step, self.bad_steps, self.images_seen = state["step"], state["bad_steps"], state["images_seen"]
        if state.get("log_window") is not None:  # older checkpoints have none: the next row starts afresh
            self.window = LogWindow.from_state(state["log_window"], f"{folder / 'state.json'}: log_window")
        if own is not None:
            torch.set_rng_state(own)
        else:  # resumed with more processes than were saved: a fresh, still deterministic, dropout stream
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.dist.rank + self.step)
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.load_extra_state(state.get("extra", {}))
        self._plan_state = state.get("plan")

    def save(self) -> Path | None:
        """Checkpoint the full training state, then export the model folder (rank 0; every rank must call it)."""
        torch_states = distributed.gather_objects(torch.get_rng_state())  # each rank's dropout stream
        with distributed.main_first(self.dist):  # the others wait until the checkpoint is on disk
            return self._write_checkpoint(torch_states) if self.dist.is_main else None

    def _write_checkpoint(self, torch_states: list[torch.Tensor]) -> Path:
        rng = rng_tensors(self.batches.state(), self.noise_gen.get_state(), torch_states) | self.streams.state()
        plan = self.planner.state().to_dict() if self.planner else self._plan_state
        state = {"bad_steps": self.bad_steps, "images_seen": self.images_seen, "plan": plan,
                 "log_window": self.window.state(),
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
        """Train up to ``train.steps`` (or to the plan of a time budget); returns the path of the last grid."""
        tc, main = self.cfg.train, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_interrupted_writes(self.out)  # temporary files of a killed earlier process
            self.write_config()
            where = f"{self.device} ({torch.get_num_threads()} threads)"
            if self.dist.active:
                where = f"{self.dist.world_size} processes ({distributed.backend()}), rank 0 on {where}"
            goal = (f"a {(self.deadline - time.perf_counter()) / 60:.2f}-minute budget from step {self.step}"
                    if self.deadline else f"steps {self.step}→{tc.steps}")
            print(f"training on {where}: {len(self.data)} images from {self.cfg.data.source}, {self.describe()}, "
                  f"{goal}, {self.batch_line()}, {self.precision}", file=sys.stderr)
            gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
            if gpus > 1 and not self.dist.active:
                print(f"note: {gpus} GPUs visible, training on one; to use all: torchrun --nproc-per-node {gpus} "
                      "-m latentdiff train ...", file=sys.stderr)
        self.planner = self._make_planner()
        show = main and (self.progress if self.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=tc.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        grid = None
        for m in self.modules().values():
            m.train()
        logger = CsvLog(self.out / "metrics.csv", self.out / "tensorboard" if tc.tensorboard else None,
                        self.step) if main else None
        t0, seen0 = time.perf_counter(), self.images_seen
        limit = time.perf_counter() + tc.time_limit * 60 if tc.time_limit else float("inf")
        if self.planner:
            self.planner.begin()
        while self.step < tc.steps:
            if self._time_is_up(limit):
                break
            for opt in self.optimizers().values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(self.step, tc)
            self.bad_flag = None
            logs = self.train_step()
            if self.scaler:
                self.scaler.update()
            self.step += 1
            bar.update(1)
            self.window.add(logs, self.bad_flag)
            if self.planner and self._replan():
                bar.total = tc.steps
            if tc.log_every and (self.step % tc.log_every == 0 or self.step == tc.steps):
                row = self._read_window(self.window)
                if logger:
                    rate = (self.images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                    row = {"step": self.step, **row, "lr": lr_at(self.step - 1, tc), "images_per_s": rate,
                           "bad_steps": self.bad_steps}
                    logger.write(row)
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{rate:.0f}")
                    if not show:
                        print(f"step {self.step}/{tc.steps} loss {row.get('loss', float('nan')):.4f} {rate:.0f} img/s",
                              file=sys.stderr)
                    if on_log:
                        on_log(row)
                t0, seen0, self.window = time.perf_counter(), self.images_seen, LogWindow(self.step + 1)
            elif self.step - self.window.first_step + 1 >= (tc.log_every or 50):  # no rows: still check the losses
                self._read_window(self.window)
                self.window = LogWindow(self.step + 1)
            t_other = time.perf_counter()
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self._read_window(self.window, keep=True)
                self.save()
            if main and tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                grid = self.preview()
            if self.planner:  # checkpoints and grids are not step time (a plan reserves them)
                self.planner.exclude(time.perf_counter() - t_other)
        bar.close()
        self.close_streams()
        self._read_window(self.window, keep=True)
        self.save()
        if not main:
            return None
        return (self.preview() if tc.grid_samples else None) or grid

    def _read_window(self, window: LogWindow, keep: bool = False) -> dict[str, float]:
        """The window's mean logs (one host sync); count its non-finite steps and stop past the limit.

        ``keep``: the window goes on (a checkpoint needs the count now, the row comes later)."""
        means, bad = window.read()
        new = bad - window.counted
        window.counted = bad if keep else 0
        self.bad_steps += new
        limit = self.cfg.train.max_bad_steps
        if self.bad_steps > limit:
            where = f"steps {window.first_step}-{self.step}" if window.first_step < self.step else f"step {self.step}"
            raise UserError(f"stopped at step {self.step}: {self.bad_steps} steps had a non-finite loss ({new} in "
                            f"{where}; limit train.max_bad_steps={limit}); lower train.lr or use train.precision=fp32")
        return means

    def write_config(self) -> None:
        """config.yaml: the run's full config, as planned so far (rank 0)."""
        cfg_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
