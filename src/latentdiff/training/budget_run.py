"""The training loop's side of a time budget (the planning itself is training/plan.py): make the planner,
apply its plans to the run's settings, stop on time; and train.batch_size=auto."""

from __future__ import annotations

import sys
import time

import torch

from latentdiff.training import distributed
from latentdiff.errors import UserError
from latentdiff.training.plan import (CALIBRATION_STEPS, BudgetPlanner, Reference, ThreadTrial, choose_batch,
                                      lr_for_batch)

UNPLANNED_STEPS = 10**9  # the loop's bound while a budgeted run calibrates (the plan replaces it)


class BudgetedRun:
    """Mixed into TrainingRun: everything a run with a deadline does beyond a run with a step count."""

    planner: BudgetPlanner | None = None
    _trial: ThreadTrial | None = None  # a budgeted CPU run's choice of thread count (training/plan.py)

    def plan_to(self, deadline: float, max_steps: int | None = None, strict: bool = True) -> None:
        """Plan this run to end (saved and exported) by ``deadline`` (a time.perf_counter() value), in at most
        ``max_steps`` steps; ``strict``: a deadline too close for the calibration steps is an error (else the
        run takes them and stops)."""
        self.deadline, self.max_steps, self.strict_budget = deadline, max_steps, strict

    # ---- what a trainer may add ---------------------------------------------------------------
    def schedule_extra(self) -> dict[str, int]:
        """The trainer's own step counts that a plan stretches with the run (e.g. when the GAN starts)."""
        return {}

    def apply_schedule_extra(self, values: dict[str, int]) -> None:
        """Set what :meth:`schedule_extra` named to the planned values."""

    def preview_seconds(self) -> float:
        """What the final grid costs (rank 0); by default: make one and time it."""
        if not self.dist.is_main:
            return 0.0
        t = time.perf_counter()
        self.preview()
        return time.perf_counter() - t

    # ---- used by the loop ---------------------------------------------------------------------
    def _choose_batch(self) -> None:
        """train.batch_size=auto: the batch that fills the device (training/plan.py), lr scaled to it."""
        tc = self.cfg.train
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def seconds(n: int) -> float:
            self.probe_step(n)  # warm-up (allocations, kernels)
            sync()
            t = time.perf_counter()
            for _ in range(2):
                self.probe_step(n)
            sync()
            return (time.perf_counter() - t) / 2

        tc.batch_size = choose_batch(seconds, tc.lr_batch, max_batch=max(tc.lr_batch, len(self.data) // 4))
        ratio = tc.batch_size / tc.lr_batch
        tc.lr = lr_for_batch(tc.lr, tc.batch_size, tc.lr_batch)
        # the same images and the same EMA half-life in images: durations in steps shrink with the batch
        tc.steps, tc.warmup_steps = max(1, round(tc.steps / ratio)), round(tc.warmup_steps / ratio)
        tc.checkpoint_every, tc.sample_every = (max(1, round(e / ratio)) if e else 0
                                                for e in (tc.checkpoint_every, tc.sample_every))
        tc.ema_decay = tc.ema_decay ** ratio
        tc.lr_batch = tc.batch_size  # resolved: a resume keeps this batch and lr
        if self.dist.is_main:
            print(f"train.batch_size=auto: {tc.batch_size} ({ratio:g}x the preset's); lr {tc.lr:.3g} (√ rule), "
                  f"{tc.steps} steps, EMA decay {tc.ema_decay:.5f} (same images, same half-life in images)",
                  file=sys.stderr)

    def probe_step(self, n: int) -> None:
        """Forward and backward of a synthetic batch of n (timing train.batch_size=auto); no weights change."""
        raise UserError(f"train.batch_size=auto is not supported when training a {self.kind}; give a number")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _make_planner(self) -> BudgetPlanner | None:
        if self.deadline is None:
            return None
        tc, saved = self.cfg.train, self._plan_state
        ref = Reference(**saved["reference"]) if saved else Reference.of(tc, self.schedule_extra())
        planner = BudgetPlanner(self.deadline, self.step, ref, started=self.started, max_steps=self.max_steps,
                                strict=self.strict_budget, spent_seconds=saved["spent_seconds"] if saved else 0.0,
                                sync=self._sync)
        tc.steps = self.max_steps or UNPLANNED_STEPS  # until the calibration steps give the plan
        n = torch.get_num_threads()
        self._trial = (ThreadTrial(self.step, [1, n], torch.set_num_threads)
                       if self.device.type == "cpu" and not tc.threads and n > 1 else None)
        if self.dist.is_main and (self.max_steps or UNPLANNED_STEPS) > self.step + 1 + CALIBRATION_STEPS:
            trial = f" (and up to 4 before them comparing 1 thread with {n})" if self._trial else ""
            print(f"budget: {(self.deadline - time.perf_counter()) / 60:.2f} min left; calibrating with "
                  f"{1 + CALIBRATION_STEPS} real steps{trial}", file=sys.stderr)
        return planner

    def _replan(self) -> bool:
        """After a step: apply a new plan when the planner makes one (rank 0's, on every process)."""
        trial = self._trial
        if trial is not None and trial.choice is None:  # first: which thread count is faster here, now
            if self.step == self.planner.start_step + 1:
                self.planner.after_step(self.step, self._timed_save, self.preview_seconds)  # the budget check
            if not trial.after_step(self.step):
                if self.dist.is_main:
                    print(trial.describe(), file=sys.stderr)
                self.planner.restart_window(self.step)
            return False
        first = self.planner.planned is None
        new = self.planner.after_step(self.step, self._timed_save, self.preview_seconds)
        if new is None:
            return False
        new = distributed.broadcast_object(new)
        self.planner.adopt(new["steps"])
        tc = self.cfg.train
        self.apply_schedule_extra(new.pop("extra"))
        for key, value in new.items():
            setattr(tc, key, value)
        if getattr(self, "ema", None) is not None:
            self.ema.decay = tc.ema_decay
        if self.dist.is_main:
            self.write_config()  # a --resume without a budget continues this plan
            if first:
                print(self.planner.describe(min(tc.batch_size, len(self.data))), file=sys.stderr)
        return True

    def _timed_save(self) -> float:
        """Write a checkpoint (the plan's first: a killed run resumes with it) and return its seconds."""
        t = time.perf_counter()
        self.save()
        return time.perf_counter() - t

    def _time_is_up(self, limit: float) -> bool:
        """train.time_limit reached, or a budget down to its reserve for the finish (every process agrees)."""
        tc, now = self.cfg.train, time.perf_counter()
        late = self.planner is not None and self.planner.out_of_time()
        if (tc.time_limit or self.planner is not None) and distributed.broadcast_flag(now > limit or late, self.device):
            if self.dist.is_main:
                why = (f"train.time_limit of {tc.time_limit} min" if now > limit else
                       f"the time budget (planned {tc.steps} steps)")
                print(f"{why} reached at step {self.step}", file=sys.stderr)
            return True
        return False
