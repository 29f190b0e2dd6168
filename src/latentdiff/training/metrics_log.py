"""A run's metrics log: ``metrics.csv`` (one row per log interval), and TensorBoard when asked for."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write


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
                raise UserError("train.tensorboard=true needs TensorBoard: "
                                "pip install 'latentdiff[tensorboard]'") from None
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


class LogWindow:
    """The logs of the steps since the last metrics row, summed where they were computed (on the device).

    Reading them costs one host synchronisation, so the loop does it only when a row is written (every
    ``train.log_every`` steps): a GPU never waits for the host in between. Steps whose loss was not finite
    (``bad``) are counted and left out of the means, as skipped steps always were.
    """

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step  # the first step of the window (1-based, as the log's step column)
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.bad: Any = 0  # a device tensor once a step reported one
        self.counted = 0  # non-finite steps of this window already added to the run's count (at a checkpoint)

    def add(self, logs: dict[str, Any], bad: Any = None) -> None:
        """One step's logs (floats or 0-d tensors) and its non-finite flag (0-d bool tensor, or None)."""
        self.count += 1
        if bad is not None:
            self.bad = self.bad + bad.to(torch.int64)
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().double()
                v = v if bad is None else torch.where(bad, torch.zeros_like(v), v)
            elif bad is not None and bool(bad):  # a float log: its step was read on the host already
                v = 0.0
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state(self) -> dict[str, Any]:
        """The window as JSON-safe values (checkpoints.LogWindowState), so a resumed run's next row averages
        the same steps as an uninterrupted run's; float64 sums travel exactly as JSON numbers."""
        return {"first_step": self.first_step, "names": list(self.sums),
                "sums": [float(v) for v in self.sums.values()], "count": self.count, "bad": int(self.bad),
                "counted": self.counted}

    @classmethod
    def from_state(cls, state: Any, where: str) -> LogWindow:
        """The window :meth:`state` saved (``where`` names it in errors; its types were checked on reading)."""
        if len(state["names"]) != len(state["sums"]):
            raise UserError(f"{where}: names and sums differ in length")
        window = cls(state["first_step"])
        window.sums = dict(zip(state["names"], state["sums"]))
        window.count, window.bad, window.counted = state["count"], state["bad"], state["counted"]
        return window

    def read(self) -> tuple[dict[str, float], int]:
        """(mean of each log over the window's finite steps, number of non-finite steps): one host sync."""
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        tensors = [self.sums[k] for k in keys] + ([self.bad] if isinstance(self.bad, torch.Tensor) else [])
        values = torch.stack([t.double() for t in tensors]).tolist() if tensors else []
        bad = int(values.pop()) if isinstance(self.bad, torch.Tensor) else int(self.bad)
        sums = {k: float(v) for k, v in self.sums.items()} | dict(zip(keys, values))
        good = self.count - bad
        return {k: (v / good if good else float("nan")) for k, v in sums.items()}, bad
