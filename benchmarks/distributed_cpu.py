"""Data-parallel training on the CPU: `latentdiff train` under torchrun with 1 and 2 gloo processes.

    python benchmarks/distributed_cpu.py [--preset mnist] [--steps 60] [--batch 64]

Same preset and global batch: 1 process with 2 threads, 1 process with 1 thread, 2 processes with 1
thread each (the same cores as the first): what data parallelism gains over threads on a CPU, what DDP's
gradient averaging costs, and that the loss curves agree. Writes
benchmarks/results/distributed_cpu.{md,json}. On a GPU machine the same commands with --device cuda
measure scaling; this file only runs on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402


def run(nproc: int, threads: int, preset: str, steps: int, batch: int) -> dict:
    """One torchrun launch; images/s from metrics.csv (after the first logged interval) and the losses."""
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", "latentdiff", "train", preset,
           "--out", str(out), "--device", "cpu", f"train.steps={steps}", f"train.batch_size={batch}",
           "train.log_every=10", "train.checkpoint_every=0", "train.grid_samples=1", "train.grid_steps=1"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows[1:]]  # the first interval includes start-up
    return {"processes": nproc, "threads_each": threads, "wall_s": wall,
            "images_per_s": sum(rates) / len(rates), "loss": [float(r["loss"]) for r in rows],
            "command": " ".join(cmd)}


def main() -> None:
    """Both runs, then the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results = [run(n, t, args.preset, args.steps, args.batch) for n, t in ((1, 2), (1, 1), (2, 1))]
    gap = max(abs(a - b) / abs(a) for r in results[1:] for a, b in zip(results[0]["loss"], r["loss"]))
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, load average {load:.1f} at start"
    lines = ["# Data-parallel training on the CPU (gloo)", "", f"Machine: {machine}", "",
             f"`python benchmarks/distributed_cpu.py --preset {args.preset} --steps {args.steps} "
             f"--batch {args.batch}`", "",
             "| processes | threads each | images/s | wall (s) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['processes']} | {r['threads_each']} | {r['images_per_s']:.0f} | {r['wall_s']:.0f} |"
              for r in results]
    lines += ["", f"Logged losses of the runs (global batch {args.batch}, every 10 steps) differ by at most "
              f"{gap:.1e} (relative): the same training.", "",
              "Commands (OMP_NUM_THREADS = threads each):", ""] + [f"    {r['command']}" for r in results]
    out = Path(__file__).parent / "results" / "distributed_cpu"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": results, "max_loss_gap": gap},
                                                   indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
