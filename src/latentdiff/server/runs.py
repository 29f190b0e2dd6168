"""Training runs for the web app: folders holding metrics.csv, their loss curves and latest sample grid."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Optional

MAX_DEPTH = 3  # runs/<group>/<run>/metrics.csv is as deep as we look


def run_id(root: Path, folder: Path) -> str:
    """A URL-safe id for a run folder: its path under ``root`` with separators as '~'."""
    rel = folder.relative_to(root).as_posix()
    return re.sub(r"[^A-Za-z0-9._~-]", "_", (root.name + "/" + rel if rel != "." else root.name).replace("/", "~"))


def find_runs(roots: list[Path]) -> dict[str, Path]:
    """Every folder with a metrics.csv under ``roots`` (at most MAX_DEPTH deep), by id."""
    found: dict[str, Path] = {}
    for root in roots:
        for metrics in sorted(root.glob("metrics.csv")) + [p for d in range(1, MAX_DEPTH + 1)
                                                            for p in sorted(root.glob("*/" * d + "metrics.csv"))]:
            found.setdefault(run_id(root, metrics.parent), metrics.parent)
    return found


def latest_grid(folder: Path) -> Optional[Path]:
    """The newest sample grid a trainer wrote (samples/step_XXXXXXXX.png sorts by step)."""
    grids = sorted((folder / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def read_metrics(folder: Path) -> dict[str, list[Optional[float]]]:
    """metrics.csv as columns of numbers (blank or non-numeric cells as None)."""
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[Optional[float]]] = {k: [] for k in (rows[0] if rows else {})}
    for row in rows:
        for k in columns:
            try:
                columns[k].append(float(row.get(k) or "nan"))
            except ValueError:
                columns[k].append(None)
    return {k: [None if v is not None and v != v else v for v in vs] for k, vs in columns.items()}


def describe(run: str, folder: Path) -> dict[str, Any]:
    """What the runs list shows for one run: name, last step and loss, the grid's URL."""
    metrics = read_metrics(folder)
    steps, losses = metrics.get("step", []), metrics.get("loss", [])
    grid = latest_grid(folder)
    return {"id": run, "name": folder.name, "steps": int(steps[-1]) if steps and steps[-1] is not None else None,
            "loss": losses[-1] if losses else None, "has_model": (folder / "model_index.json").is_file(),
            "grid": f"/api/runs/{run}/grid" if grid else None, "metrics": f"/api/runs/{run}/metrics"}
