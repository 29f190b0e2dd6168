"""The main job: text-to-image latent diffusion trained from scratch on the embedded shapes, then measured.

Three stages, the first two the ``shapes`` recipe planned to one time budget (training/recipe.py; a second
run continues where the first stopped):
1. the autoencoder (ae-shapes): 32x32 RGB -> 8x8x8 latents;
2. the text-conditional LDM (ldm-shapes) on those latents, reading prompts through the frozen packaged
   MiniLM encoder, captions dropped 10% of the time for classifier-free guidance;
3. a grid for a list of prompts (seen and unseen colour-shape pairs, two objects) and the prompt-adherence
   scores of the model-free scorer (eval/adherence.py) on fixed prompt sets, and the autoencoder's own
   ceiling: how often the scorer still reads a decoded training-distribution scene as its caption says.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from latentdiff.data.images import captioned_rows, save_png, upscale_nearest
from latentdiff.data.shapes import make_shapes
from latentdiff.data.transforms import from_uint8_image, to_uint8_image
from latentdiff.eval.adherence import format_table, score
from latentdiff.models.folder import load_autoencoder
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.evaluate import adherence_prompt_sets, evaluate_adherence
from latentdiff.pipelines.generate import Pipeline
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
]


@torch.no_grad()
def autoencoder_ceiling(ae_dir: Path, n: int = 500, seed: int = 123) -> float:
    """Share of n one-object scenes (train split, drawn with another seed than the training set) whose
    reconstruction D(E(x)) the scorer still reads as the caption says (the rendered originals all pass):
    no diffusion model on these latents can follow single-object prompts more often than this."""
    images, captions = make_shapes(n, "train", seed=seed, two_object_fraction=0.0)
    ae = load_autoencoder(ae_dir).eval()
    recon = torch.cat([to_uint8_image(ae(from_uint8_image(images[i:i + 100]), sample_posterior=False)[0])
                       for i in range(0, n, 100)])
    return sum(score(r, c)["whole"] for r, c in zip(recon, captions)) / n


def run_demo(out: Path, minutes: float | None = 8.5, n_eval: int = 100, guidance: float | None = None,
             log: Callable[[str], None] | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Train both models (the ``shapes`` recipe) planned to ``minutes`` in all, write the prompt grid and the
    adherence report. A second call continues the run (the new minutes go to the unfinished stages).

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
    seeds = 6
    images = torch.cat([pipe.run(SampleSettings(seeds, seeds, 25, "ddim", 0, prompt=p, guidance=guidance)).images
                        for p in GRID_PROMPTS])
    grid = out / "prompts.png"
    save_png(captioned_rows(upscale_nearest(images), GRID_PROMPTS, seeds), grid,
             {"prompts": GRID_PROMPTS, "sampler": "ddim", "steps": 25, "seeds": list(range(seeds)),
              "model": str(ldm_dir)})
    report = evaluate_adherence(pipe, adherence_prompt_sets(n_eval), guidance=guidance)
    table = format_table(report)
    ceiling = autoencoder_ceiling(ae_dir, min(500, 5 * n_eval))
    log(f"autoencoder ceiling: the scorer reads {100 * ceiling:.1f} % of decoded one-object training scenes right")
    summary = {"autoencoder_seconds": t_ae, "ldm_seconds": t_ldm, "grid": str(grid), "n_per_set": n_eval,
               "autoencoder_ceiling": ceiling,
               "guidance": pipe.manifest.guidance if guidance is None else guidance,
               "accuracy": report["accuracy"], "groups": report["groups"]}
    (out / "adherence.md").write_text(f"# Prompt adherence of {ldm_dir}\n\n{table}\n\nAutoencoder ceiling: the scorer "
                                      f"reads {100 * ceiling:.1f} % of decoded one-object training scenes right.\n")
    (out / "adherence.json").write_text(json.dumps(summary, indent=2))
    return summary | {"table": table}
