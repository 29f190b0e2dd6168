"""Prompt adherence of a text-to-image model on the shapes prompt sets, over the guidance scale.

    python benchmarks/adherence.py runs/demo --n 200

MODEL is the demo's output folder (its ldm/ is the model; its adherence.json gives the training
times). Every row uses the same prompts and seeds; only the guidance scale changes. Scores come from
the model-free scorer (eval/adherence.py): colour, shape, size, position (one object), relation
(two objects), count (no missing or extra objects) and whole (all of them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.eval.adherence import format_table
from latentdiff.pipelines.evaluate import adherence_prompt_sets, evaluate_adherence
from latentdiff.pipelines.generate import Pipeline

SCALES = (1.0, 1.5, 2.5, 4.0, 6.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("--n", type=int, default=200, help="prompts per set")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = Pipeline.load(args.demo / "ldm")
    sets = adherence_prompt_sets(args.n, seed=100)  # other prompts than the demo's own report (seed 0)
    demo = json.loads((args.demo / "adherence.json").read_text())
    lines = ["# Prompt adherence of the demo's text-to-image model (shapes, model-free scorer)", "",
             f"Machine: {cpu_name()}. Command: `python benchmarks/adherence.py {args.demo} --n {args.n}`.", "",
             f"Model: `latentdiff demo` — autoencoder {demo['autoencoder_seconds']:.0f} s, text-conditional LDM "
             f"{demo['ldm_seconds']:.0f} s of training on 2 CPU cores, frozen packaged MiniLM text encoder. "
             f"Sampler: DDIM {args.steps} steps; {args.n} prompts per set, drawn with another seed than the demo's "
             "own report. Unseen = the prompt names a colour–shape pair that no training caption has.", ""]
    rows = []
    for g in SCALES:
        t0 = time.perf_counter()
        r = evaluate_adherence(pipe, sets, steps=args.steps, guidance=g)
        rows.append({"guidance": g, "accuracy": r["accuracy"], "groups": r["groups"],
                     "seconds_per_image": r["seconds_per_image"]})
        print(g, {k: v["accuracy"]["whole"] for k, v in r["groups"].items()}, f"{time.perf_counter() - t0:.0f}s")
        lines += [f"## guidance {g:g} ({r['seconds_per_image'] * 1000:.0f} ms per image with guidance)", "",
                  format_table(r), ""]
    res = Path(__file__).parent / "results"
    (res / "adherence.json").write_text(json.dumps({"machine": cpu_name(), "demo": demo, "rows": rows}, indent=2))
    (res / "adherence.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
