"""`latentdiff demo` with 20 % less CPU: does the budget-planned run keep its prompt adherence?

    python benchmarks/demo_less_cpu.py --reference runs/demo-seeds/seed-0 [--share 0.4] [--out runs/demo-less-cpu]

A busy loop pinned to the last core (os.sched_setaffinity, like `taskset -c N`) takes ``share`` of every
100 ms on it: on 2 cores, 0.4 of one core is 20 % of the machine. Meanwhile a fresh `latentdiff demo --seed S`
(the reference's seed) runs in the same 8.5-minute budget, so its planner sees the slower machine and trains
fewer steps. Writes benchmarks/results/demo_less_cpu.md: adherence, diversity, steps and wall time of both runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py, beside this script

ROWS = ("1 object, seen", "1 object, unseen", "2 objects, seen, layout")


def hog(share: float, core: int) -> None:
    """Busy ``share`` of every 100 ms on ``core``, idle the rest, until killed."""
    os.sched_setaffinity(0, {core})
    while True:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.1 * share:
            pass
        time.sleep(0.1 * (1 - share))


def summary(folder: Path) -> dict:
    """What the demo wrote: adherence and diversity, the steps of each stage, the wall time if recorded."""
    result = json.loads((folder / "adherence.json").read_text())
    stages = json.loads((folder / "recipe.json").read_text())["stages"]
    wall = folder / "wall.json"
    return result | {"steps": {k: v["steps"] for k, v in stages.items()},
                     "wall_seconds": json.loads(wall.read_text())["seconds"] if wall.is_file() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="a demo folder run on the full machine")
    ap.add_argument("--seed", type=int, default=0, help="the reference's training seed")
    ap.add_argument("--share", type=float, default=0.4, help="of one core taken by the busy loop")
    ap.add_argument("--out", type=Path, default=Path("runs/demo-less-cpu"))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if not (args.out / "adherence.json").is_file():
        busy = mp.Process(target=hog, args=(args.share, cores[-1]), daemon=True)
        busy.start()
        try:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "latentdiff", "demo", "--out", str(args.out),
                            "--seed", str(args.seed)], check=True)
            (args.out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        finally:
            busy.kill()
    ref, less = summary(args.reference), summary(args.out)
    taken = args.share / len(cores)
    command = (f"python benchmarks/demo_less_cpu.py --reference {args.reference} --seed {args.seed} "
               f"--share {args.share:g}")
    lines = ["# `latentdiff demo` with less CPU", "",
             f"Machine: {cpu_name()}, {len(cores)} cores. Command: `{command}`. A busy loop pinned to core "
             f"{cores[-1]} took {args.share:.0%} of it ({taken:.0%} of the machine) during the second run; "
             "both runs planned to the demo's 8.5-minute budget, same seed.", "",
             "| | full machine | " + f"{taken:.0%} less CPU | difference |", "|---|---:|---:|---:|"]
    for row in ROWS:
        a, b = (100 * r["groups"][row]["accuracy"]["whole"] for r in (ref, less))
        lines.append(f"| {row}, whole-prompt % | {a:.0f} | {b:.0f} | {b - a:+.0f} |")
    for key in ("position", "size"):
        a, b = (r["diversity"]["groups"]["1 object"][key] for r in (ref, less))
        if a is not None and b is not None:
            lines.append(f"| 1 object, {key} spread / data's | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    for stage in ("autoencoder", "ldm"):
        a, b = ref["steps"][stage], less["steps"][stage]
        lines.append(f"| {stage} steps | {a} | {b} | {b / a - 1:+.0%} |")
    if ref["wall_seconds"] and less["wall_seconds"]:
        a, b = ref["wall_seconds"] / 60, less["wall_seconds"] / 60
        lines.append(f"| wall time, min (everything) | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    out = Path(__file__).parent / "results" / "demo_less_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"machine": cpu_name(), "command": command,
                                                      "reference": ref, "less_cpu": less}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
