"""Two-object prompt adherence of a shapes LDM with layout guidance (pipelines/layout.py), one variant at a time.

    python benchmarks/layout_guidance.py runs/demo/ldm [--one-pass] [--base-share 0.25] [--feather 8]
        [--guidance 4] [--n 100] [--seed 0] [--plain] [--div 8]

Draws the two-object prompt set of `adherence_prompt_sets(n, seed)` (seed 0: the demo's own prompts)
with layout guidance and prints the scorer's table (`--plain`: also from the prompt alone). By default in
two passes (`layout_images`: the first object alone, then the other half inpainted under the regions);
``--one-pass``: all regions in one pass (`layout_regions`). Variants: ``--base-share`` is the weight of the
whole prompt everywhere (layout.COMPOSE_BASE_SHARE, with --one-pass layout.BASE_SHARE; 0 = the halves
only), ``--feather`` ramps each half's mask over that many pixels across the boundary instead of a step.
``--div N``: N two-object prompts x 16 seeds with layout, and their spread of place and size / the data's.
"""

from __future__ import annotations

import argparse
import time

import torch

import latentdiff.pipelines.layout as layout
from latentdiff.data.shapes import eval_prompts
from latentdiff.eval.adherence import format_table
from latentdiff.eval.diversity import diversity_report, format_diversity
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.evaluate import LAYOUT_SET, adherence_prompt_sets, evaluate_adherence
from latentdiff.pipelines.generate import Pipeline


def feathered_half(px: float):
    """A replacement for layout._half: the mask ramps from 0 to 1 over ``px`` pixels around the midline."""
    def half(side: str, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        ys = (torch.arange(h).float() + 0.5 - h / 2)[:, None].expand(h, w)
        xs = (torch.arange(w).float() + 0.5 - w / 2)[None, :].expand(h, w)
        d = {"top": -ys, "bottom": ys, "left": -xs, "right": xs}[side]
        return (d / px + 0.5).clamp(0, 1)
    return half


def one_pass(pipe: Pipeline, s: SampleSettings) -> torch.Tensor:
    """The one-pass layout: both halves and the whole prompt as regions of one run (sample i: seed + i)."""
    s = layout.layout_settings(s)
    prompts = [s.prompt] * s.n_samples if isinstance(s.prompt, str) else list(s.prompt or ())
    return pipe.run(s, regions=layout.layout_regions(prompts, pipe.image_hw(s), s.seed)).images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--one-pass", action="store_true", help="all regions in one pass (layout_regions)")
    ap.add_argument("--base-share", type=float, default=None, help="default: the method's own")
    ap.add_argument("--feather", type=float, default=0.0)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="prompt seed (0: the demo's prompts)")
    ap.add_argument("--plain", action="store_true", help="also draw the prompts alone, without layout")
    ap.add_argument("--div", type=int, default=0, help="two-object prompts for diversity (16 seeds each)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.feather and not args.one_pass:
        ap.error("--feather needs --one-pass (the second pass keeps an exact half)")
    torch.set_num_threads(args.threads)
    if args.base_share is not None:
        setattr(layout, "BASE_SHARE" if args.one_pass else "COMPOSE_BASE_SHARE", args.base_share)
    base_share = layout.BASE_SHARE if args.one_pass else layout.COMPOSE_BASE_SHARE
    if args.one_pass:  # evaluate_adherence and the diversity below draw through layout.layout_images
        layout.layout_images = one_pass
    if args.feather:
        layout._half = feathered_half(args.feather)
    pipe = Pipeline.load(args.model)
    prompts = adherence_prompt_sets(args.n, args.seed)["2 objects, seen"]
    sets = ({"2 objects, seen": prompts} if args.plain else {}) | {LAYOUT_SET: prompts}
    t0 = time.perf_counter()
    report = evaluate_adherence(pipe, sets, guidance=args.guidance)
    method = "one pass" if args.one_pass else "two passes"
    print(f"{args.model}: {method}, base share {base_share:g}, feather {args.feather:g} px, guidance "
          f"{args.guidance if args.guidance is not None else pipe.manifest.guidance:g}, {args.n} prompts "
          f"(seed {args.seed}), {time.perf_counter() - t0:.0f} s\n")
    print(format_table(report))
    if args.div:
        images, names = [], []
        for p in eval_prompts(args.div, 2, True, 51):
            s = SampleSettings(16, 16, 25, "ddim", 1000, prompt=p, guidance=args.guidance)
            images.append(layout.layout_images(pipe, s))
            names += [p] * 16
        print("\n" + format_diversity(diversity_report(torch.cat(images), names)))


if __name__ == "__main__":
    main()
