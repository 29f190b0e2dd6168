"""Layout guidance for the shapes prompts: a two-object caption laid out by its grammar, each object in its half.

"a red circle above a blue square" becomes two one-object prompts, "a <size> red circle at the top…"
and "a <size> blue square at the bottom…", each guiding only its half of the image (regional guidance,
`diffusion.regional_guidance`; `Pipeline.run(settings, regions=...)`), with the whole prompt kept as a
third region over the whole image (the "base prompt" of regional-prompting tools). The demo's model
draws one object far more reliably than two (docs/demo.md), so the relation is put into the layout
instead of being left to the network. Unsaid sizes and the place across the relation's axis (left,
middle or right for "above") are drawn per sample, so samples keep their variety. The planner knows only
the shapes grammar (`parse_caption`): it is this toy world's stand-in for the layout planners of real
systems (a language model proposing boxes).

Two ways to draw with it (docs/demo.md, "Two objects"; whole-prompt adherence on the demo's model):
- :func:`layout_regions`, one pass: both halves and the whole prompt at weight BASE_SHARE (45 %);
- :func:`layout_images`, two passes, the demo's default: the first object alone with its one-object
  prompt, then the other half redrawn around it by inpainting under the regions (62–64 %).

A layout-guided run guides every step (:func:`layout_settings`), whatever the model's guidance interval:
the interval exists to keep the variety of places that guidance at the noisiest steps removes, and a
layout already draws the places; with the interval (t <= 300) the demo's model fell from 45 % to 17 %
whole-prompt adherence on two objects (one pass).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from latentdiff.data.shapes import SIZES, Scene, ShapeSpec, caption, parse_caption
from latentdiff.errors import UserError
from latentdiff.models.sampling import ListedNoise
from latentdiff.models.settings import SampleSettings, Task, per_sample

if TYPE_CHECKING:
    from latentdiff.pipelines.generate import Pipeline

# relation -> where the first and the second object go; the cross positions of each axis
SIDES = {"above": ("top", "bottom"), "below": ("bottom", "top"),
         "to the left of": ("left", "right"), "to the right of": ("right", "left")}
BASE_SHARE = 0.5  # weight of the whole prompt everywhere (0.3: 41 %, 0.5: 43 %, 0.7: 16 %; docs/demo.md)
COMPOSE_BASE_SHARE = 0.25  # the same in layout_images' second pass (0.1: 60 %, 0.25: 65 %, 0.5: 57 %; docs/demo.md)
ACROSS = {"top": ("left", "", "right"), "bottom": ("left", "", "right"),
          "left": ("top", "", "bottom"), "right": ("top", "", "bottom")}


def _position(side: str, across: str) -> str:
    """A POSITIONS word: "top left", "top", "left", "bottom right", ..."""
    if not across:
        return side
    return f"{side} {across}" if side in ("top", "bottom") else f"{across} {side}"


def _half(side: str, hw: tuple[int, int]) -> torch.Tensor:
    """An (H, W) mask of 1 on the named half of the image."""
    m = torch.zeros(hw)
    h, w = hw[0] // 2, hw[1] // 2
    index = {"top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None)),
             "left": (slice(None), slice(0, w)), "right": (slice(None), slice(w, None))}[side]
    m[index] = 1.0
    return m


def plan(prompt: str, hw: tuple[int, int], rng: np.random.Generator,
         base_share: float = BASE_SHARE) -> list[tuple[str, torch.Tensor]]:
    """The regions of one prompt: for two objects each one-object prompt on its half and the whole prompt
    everywhere (masks (1 − base_share) · half and base_share); for one object the prompt on the whole image."""
    scene = parse_caption(prompt)
    if len(scene.objects) == 1:
        return [(prompt, torch.ones(hw))]
    sides = SIDES[scene.relation]
    across = ACROSS[sides[0]][int(rng.integers(3))]  # both objects at the same place across the axis
    regions = []
    for obj, side in zip(scene.objects, sides):
        size = obj.size or list(SIZES)[int(rng.integers(len(SIZES)))]
        one = Scene((ShapeSpec(obj.colour, obj.shape, size, _position(side, across)),))
        regions.append((caption(one), (1 - base_share) * _half(side, hw)))
    return regions + [(prompt, torch.full(hw, base_share))]


def layout_regions(prompts: Sequence[str], hw: tuple[int, int], seed: int = 0) -> list[list[tuple[str, torch.Tensor]]]:
    """Regions for `Pipeline.run(settings, regions=...)` on (H, W) images: sample i planned with the generator
    of seed + i."""
    return [plan(p, hw, np.random.default_rng(seed + i)) for i, p in enumerate(prompts)]


def layout_settings(settings: SampleSettings) -> SampleSettings:
    """The settings for a layout-guided run: every step guided unless the caller chose an interval."""
    return settings if settings.guidance_max_t is not None else settings.replace(guidance_max_t=math.inf)


def layout_images(pipe: "Pipeline", settings: SampleSettings) -> torch.Tensor:
    """Two passes per two-object prompt (the demo's default): the first object alone, then the rest around it.

    Pass 1 draws the first object with its one-object prompt ("a red circle at the top") on the whole image,
    the prompt the model follows best. Pass 2 keeps that object's half and redraws the other by inpainting
    (replacement, diffusion/samplers.py) under the regions of :func:`plan` with the whole prompt at weight
    COMPOSE_BASE_SHARE: the second object's prompt guides its half, the whole prompt keeps the scene to two
    objects. Sample i plans and draws from seed + i in both passes; one-object prompts are drawn in one plain
    pass. Every step is guided (:func:`layout_settings`); the sampler must be able to inpaint (DDIM, DDPM).
    """
    s = layout_settings(settings)
    n = s.n_samples
    prompts = per_sample(s.prompt, n, "prompt") if s.prompt is not None else []
    if len(prompts) != n:
        raise UserError("layout_images needs a prompt (one, or one per sample)")
    pipe.check(s.replace(strength=1.0), Task.INPAINT)  # before pass 1: pass 2 inpaints
    hw = pipe.image_hw(s)
    plans = [plan(p, hw, np.random.default_rng(s.seed + i), COMPOSE_BASE_SHARE) for i, p in enumerate(prompts)]
    groups: dict[str | None, list[int]] = {}  # by the kept half (None: one object, a plain pass)
    for i, p in enumerate(prompts):
        scene = parse_caption(p)
        groups.setdefault(SIDES[scene.relation][0] if len(scene.objects) == 2 else None, []).append(i)
    out: list[torch.Tensor | None] = [None] * n
    for side, idx in groups.items():
        part = s.replace(n_samples=len(idx), batch_size=min(s.batch_size, len(idx)))
        noise = ListedNoise([s.seed + i for i in idx])
        if side is None:
            images = pipe.run(part.replace(prompt=tuple(prompts[i] for i in idx)), noise=noise).images
        else:
            first = pipe.run(part.replace(prompt=tuple(plans[i][0][0] for i in idx)), noise=noise).images
            images = pipe.run(part.replace(prompt=tuple(prompts[i] for i in idx)), images=first, mask=_half(side, hw),
                              regions=[plans[i] for i in idx], noise=noise).images
        for j, i in enumerate(idx):
            out[i] = images[j]
    return torch.stack([o for o in out if o is not None])
