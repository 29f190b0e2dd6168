"""Plan a training run to a wall-clock budget (DESIGN.md, performance habits: plan from the budget).

A run limited by ``train.time_limit`` stops wherever the clock says: the LR never anneals and the EMA is
tuned for another length. A *budgeted* run (``train.time_budget`` / ``latentdiff train --minutes``)
instead plans its length:

1. **calibrate**: the first steps are real training steps; one untimed (allocations), then
   ``CALIBRATION_STEPS`` timed ones give the seconds per step;
2. **reserve the finish**: a checkpoint is written right after calibration (so even a killed run can
   be resumed with its plan) and timed; the final checkpoint + export and the final sample grid
   (the trainer's ``preview_seconds`` estimate) are reserved, as are the preset's periodic checkpoints;
3. **plan**: total steps = steps done + what fits in the time left (:func:`steps_to_deadline`), and
   the schedule is the preset's, stretched to that length (:func:`scaled_settings`): the LR decays to 0
   at the last planned step (a constant schedule becomes cosine), the EMA half-life is the same
   fraction of the run as in the preset, warm-up at most a tenth of the run, and as many checkpoints
   and grids as the preset writes;
4. **re-plan** every 1/``REPLANS`` of the run from the step time measured since the previous plan, so
   a machine that slows down or speeds up still ends on time and annealed; if time runs out anyway
   the run stops at the deadline (and says so).

The plan is part of every checkpoint (``state.json``'s ``plan``): the preset's reference schedule and
the seconds spent so far. ``--resume`` with a budget continues the run: it calibrates again, then
re-plans the total from the step it resumed at, so the LR follows the preset's schedule stretched
over the new total length (a run that had annealed restarts from ½(1 + cos(π · done / total)) · lr).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from latentdiff.errors import UserError

CALIBRATION_STEPS = 4  # timed steps (after one untimed warm-up step) before the first plan
REPLANS = 20  # re-plan every 1/REPLANS of the planned steps
WARMUP_SHARE = 0.1  # warm-up takes at most this share of a planned run


def check_minutes(value: Any, name: str = "--minutes") -> float:
    """A budget in minutes: a finite number > 0, else a one-line UserError naming ``name``."""
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number of minutes, got {value!r}") from None
    if not math.isfinite(minutes) or minutes <= 0:
        raise UserError(f"{name} must be a finite number of minutes > 0, got {value!r}")
    return minutes


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), else 0: a budget counts the imports too."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        import os

        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


@dataclass
class Reference:
    """The preset's own schedule: what a plan stretches to its length."""

    steps: int
    warmup_steps: int
    ema_decay: float
    checkpoint_every: int
    sample_every: int
    lr_schedule: str
    extra: dict[str, int] = field(default_factory=dict)  # trainer-specific step counts, e.g. ae_loss.disc_start

    @classmethod
    def of(cls, tc: Any, extra: dict[str, int] | None = None) -> "Reference":
        """The reference of a TrainConfig (before any plan changed it)."""
        return cls(tc.steps, tc.warmup_steps, tc.ema_decay, tc.checkpoint_every, tc.sample_every, tc.lr_schedule,
                   dict(extra or {}))


def ema_decay_for(steps: int, ref_steps: int, ref_decay: float) -> float:
    """The per-step EMA decay whose half-life is the same fraction of a ``steps``-long run as ``ref_decay``'s
    is of ``ref_steps``: h = ln ½ / ln d_ref · steps / ref_steps, d = ½^(1/h) (EDM's half-life, in steps)."""
    if ref_decay <= 0:
        return ref_decay
    half_life = math.log(0.5) / math.log(ref_decay) * steps / ref_steps
    return 0.5 ** (1.0 / max(half_life, 1e-9))


def scaled_settings(ref: Reference, steps: int) -> dict[str, Any]:
    """The train.* settings of a ``steps``-long run planned from the preset ``ref`` (module docstring, 3.)."""

    def stretch(every: int) -> int:
        return 0 if every <= 0 or every >= ref.steps else max(1, round(every * steps / ref.steps))

    return {"steps": steps, "warmup_steps": min(ref.warmup_steps, max(1, int(WARMUP_SHARE * steps))),
            "ema_decay": ema_decay_for(steps, ref.steps, ref.ema_decay),
            "lr_schedule": "cosine" if ref.lr_schedule == "constant" else ref.lr_schedule,
            "checkpoint_every": stretch(ref.checkpoint_every), "sample_every": stretch(ref.sample_every)}


def scaled_extra(ref: Reference, steps: int) -> dict[str, int]:
    """Trainer-specific step counts stretched like the schedule (one that lies past the preset's end stays
    there: e.g. a GAN phase the preset never reaches)."""
    return {k: (round(v * steps / ref.steps) if v < ref.steps else v) for k, v in ref.extra.items()}


def steps_to_deadline(step: int, now: float, deadline: float, seconds_per_step: float, reserve: float,
                      max_steps: int | None = None, min_steps: int = 0) -> int:
    """Total planned steps: ``step`` done plus as many as fit in deadline − reserve − now (at least
    ``min_steps`` in all, at most ``max_steps``)."""
    more = math.floor(max(0.0, deadline - reserve - now) / max(seconds_per_step, 1e-9))
    total = max(step + more, min_steps, step)
    return min(total, max_steps) if max_steps else total


@dataclass
class PlanState:
    """What a checkpoint keeps of a plan (JSON): the reference schedule and the time spent on the run."""

    reference: dict[str, Any]
    spent_seconds: float = 0.0  # training time of earlier processes (their whole stage, setup to save)
    budget_minutes: float = 0.0  # this run's total: earlier processes' time plus this one's budget
    steps: int = 0
    seconds_per_step: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


class BudgetPlanner:
    """Plans one stage of training so that it ends, saved and exported, by ``deadline`` (module docstring).

    The loop calls :meth:`begin` before the first step and :meth:`after_step` after every optimiser step;
    that answers the settings to apply when a plan is made (else None), and :meth:`out_of_time` whether to
    stop now. ``clock`` is injectable, so the planning is tested with a fake clock; ``sync`` waits for the
    device (CUDA runs ahead of the host) and is called only when a time is taken.
    """

    def __init__(self, deadline: float, start_step: int, reference: Reference, *, started: float,
                 max_steps: int | None = None, min_steps: int = 0, strict: bool = True,
                 spent_seconds: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], None] = lambda: None) -> None:
        self.deadline, self.start_step, self.reference, self.clock = deadline, start_step, reference, clock
        self.started, self.max_steps, self.min_steps, self.strict = started, max_steps, min_steps, strict
        self.spent_before, self.sync = spent_seconds, sync
        self.mark: tuple[int, float] | None = None  # (step, time) where the current timing window starts
        self.planned: int | None = None
        self.seconds_per_step, self.reserve, self.save_s, self.preview_s = 0.0, 0.0, 0.0, 0.0
        self.loop_started = started
        self.excluded = 0.0  # seconds since the mark that were not training steps (checkpoints, grids)
        self.next_replan = start_step + 1 + CALIBRATION_STEPS

    # ---- what the loop calls ------------------------------------------------------------------
    def begin(self) -> None:
        """The loop is about to take its first step (setup is done); a budget already spent is an error."""
        self.loop_started = self.clock()
        if self.strict and self.loop_started >= self.deadline:
            late = self.loop_started - self.deadline
            raise UserError(f"the time budget ran out {late:.1f} s before the first training step could start "
                            f"(setting up took {self.loop_started - self.started:.1f} s); give more minutes")

    def after_step(self, step: int, save_seconds: Callable[[], float], preview_seconds: Callable[[], float]
                   ) -> dict[str, Any] | None:
        """After optimiser step ``step``: at calibration's end and at every re-plan point, the new settings."""
        if step == self.start_step + 1:
            self.sync()
            now = self.clock()
            self.mark, self.excluded = (step, now), 0.0
            self._check_budget_fits(now, now - self.loop_started)
            return None
        if step < self.next_replan or self.mark is None:
            return None
        self.sync()
        now = self.clock()
        s0, t0 = self.mark
        self.seconds_per_step = max(now - t0 - self.excluded, 1e-9) / max(step - s0, 1)
        if self.planned is None:  # the first plan: time the finish once
            self.save_s, self.preview_s = save_seconds(), preview_seconds()
            now = self.clock()
        self.reserve = self._reserve(step)
        self.planned = steps_to_deadline(step, now, self.deadline, self.seconds_per_step, self.reserve,
                                         self.max_steps, self.min_steps)
        self.mark, self.excluded = (step, now), 0.0
        self.adopt(self.planned, step)
        return scaled_settings(self.reference, self.planned) | {"extra": scaled_extra(self.reference, self.planned)}

    def adopt(self, planned: int, step: int | None = None) -> None:
        """Take ``planned`` as the plan (under torchrun: rank 0's); the next re-plan is 1/REPLANS of it away."""
        self.planned = planned
        step = self.mark[0] if step is None and self.mark else (step or self.start_step)
        self.next_replan = step + max(1, (planned - self.start_step) // REPLANS)

    def exclude(self, seconds: float) -> None:
        """The loop spent ``seconds`` on a periodic checkpoint or grid: not step time (the reserve covers it)."""
        self.excluded += seconds

    def restart_window(self, step: int) -> None:
        """Measure the step time afresh from ``step`` (the settings changed, e.g. the thread count), planning
        after CALIBRATION_STEPS more steps."""
        self.sync()
        self.mark, self.excluded = (step, self.clock()), 0.0
        self.next_replan = step + CALIBRATION_STEPS

    def out_of_time(self) -> bool:
        """True once the time left is only the reserve for the finish (the run stops early, saying so)."""
        return self.planned is not None and self.clock() > self.deadline - self.reserve

    def state(self) -> PlanState:
        """The plan as a checkpoint keeps it."""
        spent = self.spent_before + (self.clock() - self.started)
        return PlanState(asdict(self.reference), spent, (self.spent_before + self.deadline - self.started) / 60,
                         self.planned or 0, self.seconds_per_step)

    def describe(self, batch: int) -> str:
        """The plan in one line, for the log."""
        s, ref = scaled_settings(self.reference, self.planned or 1), self.reference
        half = math.log(0.5) / math.log(s["ema_decay"]) if 0 < s["ema_decay"] < 1 else 0.0
        left = (self.deadline - self.clock()) / 60
        return (f"plan: {self.planned} steps ({self.planned * batch:,} images) at {self.seconds_per_step:.3f} s/step, "
                f"ending in {left:.2f} min (reserving {self.reserve:.1f} s for saves and grids); "
                f"LR {s['lr_schedule']} to 0 at step {self.planned}, warm-up {s['warmup_steps']}; "
                f"EMA half-life {half:.0f} steps ({half * batch:,.0f} images, decay {s['ema_decay']:.5f}): "
                f"the preset's {ref.steps}-step schedule stretched")

    # ---- details ------------------------------------------------------------------------------
    def _reserve(self, step: int) -> float:
        """Seconds for the final save + grid and for the periodic checkpoints / grids still to come."""
        total = self.planned or max(self.reference.steps, step + 1)
        per = scaled_settings(self.reference, total)
        left = max(0, total - step)

        def count(every: int) -> int:
            return left // every if every else 0

        return (1 + count(per["checkpoint_every"])) * self.save_s + (1 + count(per["sample_every"])) * self.preview_s

    def _check_budget_fits(self, now: float, step_s: float) -> None:
        """A budget that cannot hold the calibration steps is a one-line error, before anything is saved."""
        if self.strict and now + CALIBRATION_STEPS * step_s > self.deadline:
            total = (self.deadline - self.started) / 60
            need = (now - self.started + (CALIBRATION_STEPS + 1) * step_s) / 60
            raise UserError(f"the time budget of {total:.3g} min is smaller than setting up "
                            f"({self.loop_started - self.started:.1f} s) "
                            f"and {CALIBRATION_STEPS + 1} training steps ({step_s:.2f} s each); give at least "
                            f"{need:.2g} min")


class ThreadTrial:
    """A budgeted run on the CPU times its first steps with each candidate thread count and keeps the fastest:
    on a busy machine one thread can beat all cores many times over (OpenMP threads wait for each other
    while other processes hold the cores; benchmarks/cpu_step_options.py), on a quiet one all cores
    win. One warm-up step, then ``steps_each`` steps per candidate, in order (1 first: the safe one), a
    candidate dropped after one step that took over twice the best so far. The steps are real training
    steps."""

    def __init__(self, start_step: int, candidates: list[int], set_threads: Callable[[int], None],
                 clock: Callable[[], float] = time.perf_counter, steps_each: int = 2) -> None:
        self.candidates, self.set_threads, self.clock, self.steps_each = candidates, set_threads, clock, steps_each
        self.warm_up = start_step + 1
        self.times: list[list[float]] = [[] for _ in candidates]
        self.current, self.t = 0, 0.0
        self.choice: int | None = None
        set_threads(candidates[0])

    def after_step(self, step: int) -> bool:
        """Record the time after ``step``; True while the trial goes on (False once the choice is set)."""
        now = self.clock()
        if step > self.warm_up:
            self.times[self.current].append(now - self.t)
            mine = self.times[self.current]
            best = min((sum(t) / len(t) for t in self.times[:self.current]), default=math.inf)
            if len(mine) >= self.steps_each or mine[-1] > 2 * best:
                self.current += 1
                if self.current == len(self.candidates):
                    means = [sum(t) / len(t) for t in self.times]
                    self.choice = self.candidates[means.index(min(means))]
                    self.set_threads(self.choice)
                    return False
                self.set_threads(self.candidates[self.current])
        self.t = self.clock()
        return True

    def describe(self) -> str:
        """The trial's outcome in one line."""
        timings = ", ".join(f"{n} thread(s) {1000 * sum(t) / len(t):.0f} ms"
                            for n, t in zip(self.candidates, self.times))
        return f"threads: {timings} per step: keeping {self.choice}"


def choose_batch(seconds_per_step: Callable[[int], float], base: int, max_batch: int, gain: float = 1.3) -> int:
    """train.batch_size=auto: double the batch from ``base`` while that still raises images/s by ``gain``x
    (the device was not full), it fits in memory, and it stays within ``max_batch``.

    Below that gain a bigger batch would mostly trade optimiser updates for images, which a budget
    cannot afford. ``seconds_per_step(n)`` times a real forward + backward at batch n.
    """
    best, rate = base, base / seconds_per_step(base)
    while best * 2 <= max_batch:
        try:
            trial = 2 * best / seconds_per_step(2 * best)
        except torch.OutOfMemoryError:
            break
        if trial < gain * rate:
            break
        best, rate = 2 * best, trial
    return best


def lr_for_batch(lr: float, batch: int, base: int) -> float:
    """The square-root rule for Adam (Malladi et al. 2022): lr · √(batch / base), base being the batch lr was
    tuned at."""
    return lr * math.sqrt(batch / base)
