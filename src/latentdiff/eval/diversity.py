"""Diversity of a text-to-image model on the shapes: how much the samples of one prompt vary, against the data.

For each prompt, the samples (one per seed) that read as the prompt says are located by the adherence
scorer (eval/adherence.py: `match`), and the spread of each named object over them is measured: the
standard deviation of its centre (x and y pooled, in pixels: position) and of its box side √(w·h)
(size), averaged over the prompt's objects. The data's spread is measured the same way, by the same
detector, on renderings of the same caption (`render` draws the unsaid size and the place as the data
set does), so detection noise is on both sides. The ratio model / data is ~1 for a generator as varied
as the data set and 0 for one that draws the same picture for every seed. The palette has one shade per
colour, so there is no colour spread to compare.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from latentdiff.data.shapes import parse_caption, render
from latentdiff.errors import UserError
from latentdiff.eval.adherence import Detected, match

MIN_SAMPLES = 4  # fewer samples that read right: no spread is reported for the prompt
DATA_SAMPLES = 64  # renderings per caption for the data's own spread
MEASURES = ("position", "size")


def spread(images: Sequence[Any], prompt: str) -> dict[str, Any]:
    """{"n": samples that read as the prompt, "position": px, "size": px} (spreads None when n < MIN_SAMPLES)."""
    found: list[tuple[Detected, ...]] = []
    for image in images:
        scores, objects = match(image, prompt)
        if scores["whole"]:
            found.append(objects)
    if len(found) < MIN_SAMPLES:
        return {"n": len(found), "position": None, "size": None}
    pos, size = [], []
    for j in range(len(found[0])):  # the prompt's j-th object in every sample (matched in prompt order)
        cx, cy = np.array([f[j].cx for f in found]), np.array([f[j].cy for f in found])
        side = np.sqrt([f[j].width * f[j].height for f in found])
        pos.append((cx.var(ddof=1) + cy.var(ddof=1)) / 2)
        size.append(side.var(ddof=1))
    return {"n": len(found), "position": float(np.sqrt(np.mean(pos))), "size": float(np.sqrt(np.mean(size)))}


@functools.lru_cache(maxsize=1024)
def data_spread(prompt: str, image_size: int = 32, n: int = DATA_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """The spread of n renderings of the prompt's scene, as the data set draws it."""
    rng = np.random.default_rng(seed)
    scene = parse_caption(prompt)
    return spread([render(scene, image_size, rng) for _ in range(n)], prompt)


def diversity_report(images: Sequence[Any], prompts: Sequence[str], groups: Sequence[str] | None = None) -> dict:
    """Per prompt (images: one per seed, several per prompt) the spreads and their ratios to the data's;
    per group (default: object count) and overall the median ratio over prompts with enough samples."""
    if len(images) != len(prompts):
        raise UserError(f"diversity_report: {len(images)} images but {len(prompts)} prompts")
    if groups is not None and len(groups) != len(prompts):
        raise UserError(f"diversity_report: {len(groups)} group names for {len(prompts)} prompts")
    if groups is None:
        groups = ["1 object" if len(parse_caption(p).objects) == 1 else "2 objects" for p in prompts]
    by_prompt: dict[str, list[Any]] = {}
    group_of: dict[str, str] = {}
    for image, p, g in zip(images, prompts, groups):
        by_prompt.setdefault(p, []).append(image)
        group_of[p] = g
    rows = {}
    for p, imgs in by_prompt.items():
        size = int(np.asarray(imgs[0]).shape[-2])
        model, data = spread(imgs, p), data_spread(p, size)
        ratio = {k: model[k] / data[k] if model[k] is not None and data[k] else None for k in MEASURES}
        rows[p] = {"group": group_of[p], "samples": len(imgs), "n": model["n"], "model": model, "data": data,
                   "ratio": ratio}

    def summary(names: list[str]) -> dict:
        out: dict[str, Any] = {"n_prompts": len(names)}
        for k in MEASURES:
            vals = [rows[p]["ratio"][k] for p in names if rows[p]["ratio"][k] is not None]
            out[k] = float(np.median(vals)) if vals else None
            out[f"{k}_prompts"] = len(vals)
        return out

    by_group = {g: summary([p for p in rows if rows[p]["group"] == g]) for g in dict.fromkeys(groups)}
    return {**summary(list(rows)), "groups": by_group, "prompts": rows}


def format_diversity(report: dict) -> str:
    """Markdown table: per group and overall, the median position and size ratio (model / data spread)."""
    lines = ["| prompts | prompts measured | position spread / data's | size spread / data's |", "|---|---:|---:|---:|"]
    for name, r in [*report["groups"].items(), ("all", report)]:
        cells = [f"{r[k]:.2f}" if r[k] is not None else "–" for k in MEASURES]
        lines.append(f"| {name} | {r['position_prompts']} of {r['n_prompts']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
