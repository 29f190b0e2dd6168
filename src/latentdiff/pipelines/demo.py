"""The main job: text-to-image latent diffusion trained from scratch on the embedded shapes, then measured.

Three stages, the first two the ``shapes`` recipe planned to one time budget (training/recipe.py; a second
run continues where the first stopped):
1. the autoencoder (ae-shapes): 32x32 RGB -> 8x8x8 latents;
2. the text-conditional LDM (ldm-shapes) on those latents, reading prompts through the frozen packaged
   MiniLM encoder, captions dropped 10% of the time for classifier-free guidance;
3. a grid for a list of prompts (seen and unseen colour-shape pairs, two objects), several seeds each,
   two-object prompts with layout guidance (the first object alone, then the other half redrawn around it
   under regional prompts: pipelines/layout.py, layout_images);
   the prompt-adherence scores of the model-free scorer (eval/adherence.py) on fixed prompt sets (the
   two-object set both from the prompt alone and with layout guidance); the
   diversity of the grid's prompts over DIVERSITY_SEEDS seeds against the data's own (eval/diversity.py);
   and the autoencoder's ceilings: how often the scorer still reads a decoded training-distribution
   scene (one object, two objects) as its caption says.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from latentdiff.data.images import captioned_rows, save_png, upscale_nearest
from latentdiff.data.shapes import make_shapes, parse_caption
from latentdiff.data.transforms import from_uint8_image, to_uint8_image
from latentdiff.eval.adherence import format_table, score
from latentdiff.eval.diversity import diversity_report, format_diversity
from latentdiff.models.folder import load_autoencoder
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.evaluate import adherence_prompt_sets, evaluate_adherence
from latentdiff.pipelines.generate import Pipeline
from latentdiff.pipelines.layout import layout_images
from latentdiff.training.recipe import STATE, run_recipe

GRID_PROMPTS = [
    "a large red circle in the center",
    "a small blue square at the top left",
    "a large yellow triangle at the bottom right",
    "a small white cross on the left",
    "a large purple circle at the top",
    "a small red triangle at the top right",  # unseen pair: no red triangle in the training data
    "a large green circle on the right",  # unseen
    "a small blue cross at the bottom",  # unseen
    "a red circle above a blue square",
    "a white square to the left of a yellow circle",
    "a large green triangle below a small purple cross",
    "a blue circle to the right of a red square",
]
LAYOUT_PROMPTS = [p for p in GRID_PROMPTS if len(parse_caption(p).objects) == 2]  # drawn with layout guidance
GRID_SEEDS = 8  # columns of the grid: the first seeds of the DIVERSITY_SEEDS drawn per prompt
DIVERSITY_SEEDS = 16


@torch.no_grad()
def autoencoder_ceiling(ae_dir: Path, n: int = 500, seed: int = 123, objects: int = 1) -> float:
    """Share of n scenes with ``objects`` objects (train split, drawn with another seed than the training
    set) whose reconstruction D(E(x)) the scorer still reads as the caption says (the rendered originals
    all pass): no diffusion model on these latents can follow such prompts more often than this."""
    images, captions = make_shapes(n, "train", seed=seed, two_object_fraction=float(objects == 2))
    ae = load_autoencoder(ae_dir).eval()
    recon = torch.cat([to_uint8_image(ae(from_uint8_image(images[i:i + 100]), sample_posterior=False)[0])
                       for i in range(0, n, 100)])
    return sum(score(r, c)["whole"] for r, c in zip(recon, captions)) / n


def prompt_grid(pipe: Pipeline, path: Path, guidance: float | None, model: str = "") -> dict[str, Any]:
    """DIVERSITY_SEEDS samples of every grid prompt (the same seeds in every row), two-object prompts with
    layout guidance (pipelines/layout.py); the first GRID_SEEDS of each are drawn as a grid at ``path``;
    returns the diversity report over all of them."""
    n, images = DIVERSITY_SEEDS, []
    for p in GRID_PROMPTS:
        s = SampleSettings(n, n, 25, "ddim", 0, prompt=p, guidance=guidance)
        images.append(layout_images(pipe, s) if p in LAYOUT_PROMPTS else pipe.run(s).images)
    images = torch.cat(images)
    shown = images.reshape(len(GRID_PROMPTS), DIVERSITY_SEEDS, *images.shape[1:])[:, :GRID_SEEDS].flatten(0, 1)
    save_png(captioned_rows(upscale_nearest(shown), GRID_PROMPTS, GRID_SEEDS), path,
             {"prompts": GRID_PROMPTS, "layout": LAYOUT_PROMPTS, "sampler": "ddim", "steps": 25,
              "seeds": list(range(GRID_SEEDS)), "model": model})
    groups = ["2 objects, layout" if p in LAYOUT_PROMPTS else "1 object" for p in GRID_PROMPTS for _ in range(n)]
    return diversity_report(images, [p for p in GRID_PROMPTS for _ in range(n)], groups)


def run_demo(out: Path, minutes: float | None = 8.5, n_eval: int = 100, guidance: float | None = None,
             log: Callable[[str], None] | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Train both models (the ``shapes`` recipe) planned to ``minutes`` in all, write the prompt grid and the
    adherence and diversity report. A second call continues the run (the new minutes go to the unfinished stages).

    ``minutes`` None trains each preset's own steps; ``overrides`` (``section.key=value``) go to both
    trainings, e.g. a smaller data set for tests.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    ae_dir, ldm_dir = out / "autoencoder", out / "ldm"
    t0 = time.perf_counter()
    run_recipe("shapes", out, minutes, list(overrides), resume=True, log=log)
    stages = json.loads((out / STATE).read_text())["stages"]  # seconds of all runs of each stage
    t_ae, t_ldm = stages["autoencoder"]["seconds"], stages["ldm"]["seconds"]
    log(f"trained in {(time.perf_counter() - t0) / 60:.1f} min (budget {minutes} min)")
    pipe = Pipeline.load(ldm_dir)
    grid = out / "prompts.png"
    diversity = prompt_grid(pipe, grid, guidance, str(ldm_dir))
    report = evaluate_adherence(pipe, adherence_prompt_sets(n_eval, layout=True), guidance=guidance)
    table, div_table = format_table(report), format_diversity(diversity)
    n_ceiling = min(500, 5 * n_eval)
    ceilings = {"1 object": autoencoder_ceiling(ae_dir, n_ceiling),
                "2 objects": autoencoder_ceiling(ae_dir, n_ceiling // 2, objects=2)}
    ceiling_text = ("Autoencoder ceiling: the scorer reads " + " and ".join(
        f"{100 * v:.1f} % of decoded {k} training scenes" for k, v in ceilings.items()) + " right.")
    log(ceiling_text)
    summary = {"autoencoder_seconds": t_ae, "ldm_seconds": t_ldm, "grid": str(grid), "n_per_set": n_eval,
               "autoencoder_ceiling": ceilings["1 object"], "autoencoder_ceilings": ceilings,
               "guidance": pipe.manifest.guidance if guidance is None else guidance,
               "accuracy": report["accuracy"], "groups": report["groups"],
               "diversity": {k: v for k, v in diversity.items() if k != "prompts"},
               "diversity_prompts": {p: {k: r[k] for k in ("n", "ratio")} for p, r in diversity["prompts"].items()}}
    (out / "adherence.md").write_text(
        f"# Prompt adherence of {ldm_dir}\n\n{table}\n\n## Diversity over {DIVERSITY_SEEDS} seeds of the grid's "
        f"prompts (spread of the samples that read right / the data's spread)\n\n{div_table}\n\n{ceiling_text}\n")
    (out / "adherence.json").write_text(json.dumps(summary, indent=2))
    return summary | {"table": table, "diversity_table": div_table}
