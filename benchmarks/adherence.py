"""Prompt adherence and diversity of a text-to-image model on the shapes prompt sets, over the guidance scale.

    python benchmarks/adherence.py runs/demo --n 200 [--guidance-max-t 500]

MODEL is the demo's output folder (its ldm/ is the model; its adherence.json gives the training
times). Every row uses the same prompts and seeds; only the guidance scale changes. Scores come from
the model-free scorer (eval/adherence.py): count (exactly the named objects), whole (everything
right) and, over the images that hold exactly the named objects, colour, shape, size, position (one
object) and relation (two objects); the two-object prompts once more with layout guidance (pipelines/layout.py),
as the row "2 objects, seen, layout". Diversity (eval/diversity.py): for --div-prompts prompts per object
count, --div-seeds samples each; the spread of place and size of the samples that read right,
divided by the data's own spread for that caption (1 = as varied as the data), median over prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.data.shapes import eval_prompts
from latentdiff.eval.adherence import format_table
from latentdiff.eval.diversity import diversity_report, format_diversity
from latentdiff.pipelines.evaluate import adherence_prompt_sets, evaluate_adherence
from latentdiff.pipelines.generate import Pipeline

SCALES = (1.0, 1.5, 2.5, 4.0, 6.0)


def diversity(pipe: Pipeline, prompts: list[str], seeds: int, steps: int, guidance: float) -> dict:
    """``seeds`` samples of every prompt (the same seeds for each) and their diversity report."""
    images = torch.cat([pipe.generate(seeds, seeds, steps, "ddim", seed=1000, prompt=p, guidance=guidance)
                        for p in prompts])
    return diversity_report(images, [p for p in prompts for _ in range(seeds)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("--n", type=int, default=200, help="prompts per set")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--div-prompts", type=int, default=16, help="prompts per object count for diversity")
    ap.add_argument("--div-seeds", type=int, default=16, help="samples per prompt for diversity")
    ap.add_argument("--guidance-max-t", type=float, default=None,
                    help="guide only steps with t <= this (default: the model's own setting)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = Pipeline.load(args.demo / "ldm")
    if args.guidance_max_t is not None:
        pipe.manifest = dataclasses.replace(pipe.manifest, conditioning=dataclasses.replace(
            pipe.manifest.conditioning, guidance_max_t=args.guidance_max_t))
    max_t = pipe.manifest.conditioning.guidance_max_t
    sets = adherence_prompt_sets(args.n, seed=100, layout=True)  # other prompts than the demo's report (seed 0)
    div_prompts = eval_prompts(args.div_prompts, 1, True, 200) + eval_prompts(args.div_prompts, 2, True, 201)
    demo = json.loads((args.demo / "adherence.json").read_text())
    command = f"python benchmarks/adherence.py {args.demo} --n {args.n}" + (
        f" --guidance-max-t {args.guidance_max_t:g}" if args.guidance_max_t is not None else "")
    lines = ["# Prompt adherence and diversity of the demo's text-to-image model (shapes, model-free scorer)", "",
             f"Machine: {cpu_name()}. Command: `{command}`.", "",
             f"Model: `latentdiff demo` — autoencoder {demo['autoencoder_seconds']:.0f} s, text-conditional LDM "
             f"{demo['ldm_seconds']:.0f} s of training on 2 CPU cores, frozen packaged MiniLM text encoder. "
             f"Sampler: DDIM {args.steps} steps, guided "
             + (f"only at t ≤ {max_t:g} (of 1000)" if max_t is not None else "at every step")
             + f"; {args.n} prompts per set, drawn with another seed than the demo's own report. "
             "Unseen = the prompt names a colour–shape pair that no training caption has. \"matched\": images "
             "that hold exactly the named objects, over which colour, shape, size, position and relation are "
             f"rated. Diversity: {args.div_prompts} prompts per object count, {args.div_seeds} seeds each; the "
             "spread of place and size over the samples that read right / the data's spread for the caption.", ""]
    rows = []
    for g in SCALES:
        t0 = time.perf_counter()
        r = evaluate_adherence(pipe, sets, steps=args.steps, guidance=g)
        d = diversity(pipe, div_prompts, args.div_seeds, args.steps, g)
        rows.append({"guidance": g, "accuracy": r["accuracy"], "groups": r["groups"],
                     "seconds_per_image": r["seconds_per_image"],
                     "diversity": {k: v for k, v in d.items() if k != "prompts"}})
        print(g, {k: v["accuracy"]["whole"] for k, v in r["groups"].items()},
              {k: v["position"] for k, v in d["groups"].items()}, f"{time.perf_counter() - t0:.0f}s")
        lines += [f"## guidance {g:g} ({r['seconds_per_image'] * 1000:.0f} ms per image)", "",
                  format_table(r), "", format_diversity(d), ""]
    res = Path(__file__).parent / "results"
    (res / "adherence_guidance.json").write_text(json.dumps({"machine": cpu_name(), "command": command, "demo": demo,
                                                    "guidance_max_t": max_t, "rows": rows}, indent=2))
    (res / "adherence_guidance.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
