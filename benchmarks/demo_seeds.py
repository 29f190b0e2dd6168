"""`latentdiff demo` over several training seeds: prompt adherence, diversity and wall time of each, and the mean.

    python benchmarks/demo_seeds.py --seeds 0 1 2 [--out runs/demo-seeds] [--minutes 8.5] [--note "quiet"]

Each seed is a fresh `python -m latentdiff demo --out OUT/seed-N --seed N` in its own process, timed from
start to exit (set-up check, data, both trainings in the one budget, the latent encoding, the grid, the
scored images); a seed whose folder already holds adherence.json and wall.json is read back, not rerun. Writes
benchmarks/results/adherence.md and .json: whole-prompt adherence per set and seed (model-free scorer,
eval/adherence.py), the diversity of the grid's prompts (eval/diversity.py), the steps each stage trained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py, beside this script

ROWS = ("1 object, seen", "1 object, unseen", "2 objects, seen", "2 objects, seen, layout")


def run_seed(out: Path, seed: int, minutes: str) -> dict:
    """The demo's summary for one seed (run now unless its folder has one), with its wall time and steps."""
    summary, wall = out / "adherence.json", out / "wall.json"
    if not (summary.is_file() and wall.is_file()):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "latentdiff", "demo", "--out", str(out), "--seed", str(seed),
                        "--minutes", minutes], check=True)
        wall.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    result = json.loads(summary.read_text())
    stages = json.loads((out / "recipe.json").read_text())["stages"]
    return result | {"wall_seconds": json.loads(wall.read_text())["seconds"], "seed": seed,
                     "steps": {k: v["steps"] for k, v in stages.items()}}


def pct(x: float | None) -> str:
    """A rate as a percentage cell."""
    return "–" if x is None else f"{100 * x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-seeds"))
    ap.add_argument("--minutes", default="8.5")
    ap.add_argument("--note", default="", help="how the machine was (quiet, shared, ...), for the results file")
    args = ap.parse_args()
    runs = [run_seed(args.out / f"seed-{s}", s, args.minutes) for s in args.seeds]
    command = f"python benchmarks/demo_seeds.py --seeds {' '.join(map(str, args.seeds))} --minutes {args.minutes}"
    head = "| prompts | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean |"
    lines = ["# `latentdiff demo` over training seeds: prompt adherence and diversity", "",
             f"Machine: {cpu_name()}, 2 cores{'; ' + args.note if args.note else ''}. Command: `{command}` "
             "(each seed a fresh `latentdiff demo --seed N` in its own process).", "",
             "Whole-prompt adherence in % (the model-free scorer, eval/adherence.py; 100 prompts per set, the "
             "demo's own, DDIM 25 steps; \"layout\": the same two-object prompts drawn with layout guidance, "
             "pipelines/layout.py):", "", head, "|---|" + "---:|" * (len(runs) + 1)]
    for row in ROWS:
        vals = [r["groups"][row]["accuracy"]["whole"] for r in runs if row in r["groups"]]
        lines.append(f"| {row} | " + " | ".join(map(pct, vals)) + f" | {pct(statistics.mean(vals))} |")
    lines += ["", "Diversity of the grid's prompts over 16 seeds (spread of place / size of the samples that read "
              "right, over the data's own spread for the caption; median over prompts; 1 = as varied as the data):",
              "", head, "|---|" + "---:|" * (len(runs) + 1)]
    for group in runs[0]["diversity"]["groups"]:
        for key in ("position", "size"):
            vals = [r["diversity"]["groups"][group][key] for r in runs]
            cells = ["–" if v is None else f"{v:.2f}" for v in vals]
            known = [v for v in vals if v is not None]
            mean = f"{statistics.mean(known):.2f}" if known else "–"
            lines.append(f"| {group}: {key} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", head.replace("prompts", "run"), "|---|" + "---:|" * (len(runs) + 1)]
    for name, get in [("wall time, min (everything)", lambda r: r["wall_seconds"] / 60),
                      ("autoencoder steps", lambda r: r["steps"]["autoencoder"]),
                      ("LDM steps", lambda r: r["steps"]["ldm"]),
                      ("autoencoder ceiling, 1 object %", lambda r: 100 * r["autoencoder_ceilings"]["1 object"]),
                      ("autoencoder ceiling, 2 objects %", lambda r: 100 * r["autoencoder_ceilings"]["2 objects"])]:
        vals = [get(r) for r in runs]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in vals)
                     + f" | {statistics.mean(vals):.1f} |")
    res = Path(__file__).parent / "results"
    (res / "adherence.md").write_text("\n".join(lines) + "\n")
    (res / "adherence.json").write_text(json.dumps({"machine": cpu_name(), "command": command, "note": args.note,
                                                    "runs": runs}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
