"""A run's metrics log: ``metrics.csv`` (one row per log interval), and TensorBoard when asked for."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

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
