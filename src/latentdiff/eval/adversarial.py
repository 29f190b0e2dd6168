"""Renderings the adherence scorer must refuse: near misses of the shapes data that a blurry generator draws.

Each probe takes a real one-object scene (its caption, place and size) and changes one thing the caption
does not allow: a box that is not square (a 3:1 rectangle, ellipse, squashed triangle or cross, a
10x2 px bar), a shape that is not filled (an outline, a ring), a colour outside the palette (grey, brown,
pink, cyan, or halfway between two palette colours), or the object replaced by blocky colour noise. The
scorer's self-tests require that none of them reads as its caption, while the true renderings all do;
`benchmarks/scorer_calibration.py` puts the scorer's thresholds between the two.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np

from latentdiff.data.shapes import (BACKGROUND, COLOURS, SHAPES, Scene, ShapeSpec, caption, coverage, layout,
                                    random_scene)

Probe = tuple[np.ndarray, str]  # (uint8 H×W×3 image, the caption it must not satisfy)
Box = tuple[float, float, float, float]  # cx, cy, w, h in pixels
Cover = Callable[[Box, tuple[int, int, int, int]], np.ndarray]  # (box, pixel window) -> coverage in [0, 1]

# Off-palette colours, each beside the palette colour a lenient scorer mistook it for (a few shades each).
OFF_PALETTE: dict[str, tuple[str, list[tuple[int, int, int]]]] = {
    "grey": ("white", [(100, 100, 100), (128, 128, 128), (160, 160, 160)]),
    "brown": ("red", [(120, 60, 20), (150, 75, 30), (165, 90, 45)]),
    "pink": ("purple", [(255, 150, 200), (230, 120, 200), (240, 110, 170)]),
    "cyan": ("blue", [(40, 200, 220), (60, 180, 230), (30, 220, 200)]),
}


def draw(objects: list[tuple[Cover, Box, tuple[int, int, int]]], image_size: int = 32) -> np.ndarray:
    """uint8 (H, W, 3): each (coverage function, box (cx, cy, w, h), RGB) blended over BACKGROUND in turn."""
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUND
    for cover, (cx, cy, bw, bh), rgb in objects:
        x0, y0 = max(0, math.floor(cx - bw / 2)), max(0, math.floor(cy - bh / 2))
        x1, y1 = min(image_size, math.ceil(cx + bw / 2)), min(image_size, math.ceil(cy + bh / 2))
        a = cover((cx, cy, bw, bh), (x0, y0, x1, y1))[..., None]
        img[y0:y1, x0:x1] += a * (np.asarray(rgb, np.float32) - img[y0:y1, x0:x1])
    return (img + 0.5).astype(np.uint8)


def solid(shape: str) -> Cover:
    """The data set's own anti-aliased coverage of a shape in a box."""
    return lambda box, window: coverage(shape, box, window)


def outline(shape: str, width: float) -> Cover:
    """The shape minus the same shape shrunk by `width` px on every side: an outline (square) or a ring (circle)."""
    def cover(box: Box, window: tuple[int, int, int, int]) -> np.ndarray:
        cx, cy, bw, bh = box
        inner = coverage(shape, (cx, cy, bw - 2 * width, bh - 2 * width), window)
        return np.clip(coverage(shape, box, window) - inner, 0, 1)
    return cover


def blocky_noise(rng: np.random.Generator, image_size: int = 32, block: int = 4, share: float = 0.5) -> np.ndarray:
    """Blocks of random palette colours on the background: clutter in which some blob fits any caption."""
    g = image_size // block
    colours = np.array(list(COLOURS.values()), np.uint8)
    img = np.empty((g, g, 3), np.uint8)
    img[:] = BACKGROUND
    on = rng.random((g, g)) < share
    img[on] = colours[rng.integers(len(colours), size=int(on.sum()))]
    return img.repeat(block, 0).repeat(block, 1)


def adversarial_probes(n: int = 12, seed: int = 0, image_size: int = 32) -> dict[str, list[Probe]]:
    """n probes of each kind, each at the place and size of a random one-object scene whose caption it carries."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Probe]] = {}
    pairs = list(itertools.combinations(COLOURS, 2))

    def scene(shape: str, colour: str, size: str | None = None) -> tuple[str, float, float, float]:
        s = random_scene(rng)
        o = s.objects[0]
        spec = ShapeSpec(colour, shape, size or o.size, o.position)
        _, cx, cy, side = layout(Scene((spec,)), image_size, rng)[0]
        return caption(Scene((spec,))), cx, cy, side

    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        for name, shape, (fw, fh) in [("3:1 rectangle", "square", (1.5, 0.5)), ("1:3 rectangle", "square", (0.5, 1.5)),
                                      ("3:1 ellipse", "circle", (1.5, 0.5)), ("1:3 ellipse", "circle", (0.5, 1.5)),
                                      ("squashed triangle", "triangle", (1.25, 0.5)),
                                      ("squashed cross", "cross", (1.25, 0.5))]:
            text, cx, cy, s = scene(shape, colour)
            out.setdefault(name, []).append((draw([(solid(shape), (cx, cy, fw * s, fh * s), COLOURS[colour])],
                                                  image_size), text))
        text, cx, cy, _ = scene("square", colour, "small")
        bar = (10, 2) if i % 2 == 0 else (2, 10)
        out.setdefault("10x2 bar", []).append((draw([(solid("square"), (cx, cy, *bar), COLOURS[colour])],
                                                    image_size), text))
        for name, shape in [("hollow square, 3 px outline", "square"), ("ring, 3 px", "circle")]:
            text, cx, cy, s = scene(shape, colour, "large")
            out.setdefault(name, []).append((draw([(outline(shape, 3), (cx, cy, s, s), COLOURS[colour])],
                                                  image_size), text))
        for name, (near, shades) in OFF_PALETTE.items():
            text, cx, cy, s = scene(SHAPES[i % len(SHAPES)], near)
            rgb = shades[i % len(shades)]
            out.setdefault(f"{name} (as {near})", []).append((draw([(solid(SHAPES[i % len(SHAPES)]),
                                                                     (cx, cy, s, s), rgb)], image_size), text))
        a, b = pairs[i % len(pairs)]
        text, cx, cy, s = scene(SHAPES[i % len(SHAPES)], (a, b)[i % 2])
        mid = tuple((x + y) / 2 for x, y in zip(COLOURS[a], COLOURS[b]))
        out.setdefault("halfway between two palette colours", []).append(
            (draw([(solid(SHAPES[i % len(SHAPES)]), (cx, cy, s, s), mid)], image_size), text))
        text = caption(random_scene(rng))
        out.setdefault("blocky colour noise", []).append((blocky_noise(rng, image_size), text))
    return out
