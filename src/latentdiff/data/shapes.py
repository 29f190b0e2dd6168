"""Embedded procedural captioned dataset: coloured shapes on a dark background, with exact captions.

One object ("a small red circle at the top left") or two ("a red circle above a large blue square").
Small enough to learn on a CPU in minutes; its grammar is closed, so `parse_caption` inverts `caption`
and `latentdiff.eval.adherence` can check any generated image against its prompt without a model.
A few (colour, shape) pairs (HELD_OUT) never appear in the train split, to test composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from latentdiff.errors import UserError

BACKGROUND = (16, 16, 16)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (235, 215, 40),
    "purple": (170, 60, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")  # cross = plus sign; each fills an s×s box
SIZES: dict[str, float] = {"small": 0.3, "large": 0.45}  # side of the object's box / image side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("above", "below", "to the left of", "to the right of")
# Never in the train split; every colour and every shape still appears in training with others.
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")})

SIZE_JITTER = 0.05  # relative; small*1.05 stays far below large*0.95, so sizes never blur together
CROSS_HALF_WIDTH = 0.2  # arm half-width of the plus sign, in units of the box side
_PREPOSITION = {"center": "in the", "left": "on the", "right": "on the"}  # else "at the"
_SYNONYMS = {"centre": "center", "middle": "center", "an": "a"}
_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
_SEEN = [p for p in _PAIRS if p not in HELD_OUT]
_HELD = sorted(HELD_OUT)
_GRAMMAR = {"a", "the", "at", "on", "in", "to", "of"}
_VOCAB = set(COLOURS) | set(SHAPES) | set(SIZES) | {w for p in POSITIONS + RELATIONS for w in p.split()}
_VOCAB |= _GRAMMAR | set(_SYNONYMS)


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene; size and position None mean "not said" (drawn at random when rendering)."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None  # a POSITIONS word; only for one-object scenes

    def __post_init__(self) -> None:
        for key, known in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, key)
            if value not in known and not (value is None and key in ("size", "position")):
                raise UserError(f"{key}: unknown {value!r}; known: {', '.join(known)}")


@dataclass(frozen=True)
class Scene:
    """One object, or two objects and how the first relates to the second (a RELATIONS phrase)."""

    objects: tuple[ShapeSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) == 1 and self.relation is not None:
            raise UserError(f"a one-object scene has no relation, got {self.relation!r}")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise UserError(f"relation: unknown {self.relation!r}; known: {', '.join(RELATIONS)}")
        if len(self.objects) not in (1, 2) or (len(self.objects) == 2 and any(o.position for o in self.objects)):
            raise UserError("a scene holds one object (with a position) or two (placed by their relation)")


# ------------------------------------------------------------------------------------ captions


def _object_phrase(o: ShapeSpec) -> str:
    return " ".join(["a"] + ([o.size] if o.size else []) + [o.colour, o.shape])


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a large blue square in the center" or "a red circle above a green cross"."""
    if len(scene.objects) == 2:
        return f"{_object_phrase(scene.objects[0])} {scene.relation} {_object_phrase(scene.objects[1])}"
    o = scene.objects[0]
    where = f" {_PREPOSITION.get(o.position, 'at the')} {o.position}" if o.position else ""
    return _object_phrase(o) + where


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` (case, spacing, "an", "centre" and a final period are forgiven)."""
    words = [_SYNONYMS.get(w, w) for w in text.lower().replace(",", " ").strip().rstrip(".").split()]
    for w in words:
        if w not in _VOCAB:
            raise UserError(f"prompt {text!r}: unknown word {w!r} (colours: {', '.join(COLOURS)}; "
                            f"shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)})")
    pos = 0

    def fail(expected: str) -> UserError:
        rest = " ".join(words[pos:]) or "the end"
        return UserError(f"prompt {text!r}: expected {expected} at {rest!r}")

    def take(phrases: tuple[str, ...] | list[str]) -> str | None:
        nonlocal pos
        for p in sorted(phrases, key=lambda p: -len(p.split())):  # longest first: "top left" before "top"
            n = len(p.split())
            if " ".join(words[pos : pos + n]) == p:
                pos += n
                return p
        return None

    def need(phrases: tuple[str, ...] | list[str], expected: str) -> str:
        found = take(phrases)
        if found is None:
            raise fail(expected)
        return found

    def obj() -> ShapeSpec:
        need(["a"], "'a'")
        size = take(list(SIZES))
        return ShapeSpec(need(list(COLOURS), "a colour"), need(SHAPES, "a shape"), size)

    first = obj()
    if pos == len(words):
        return Scene((first,))
    relation = take(RELATIONS)
    if relation:
        second = obj()
        if pos != len(words):
            raise fail("the end")
        return Scene((first, second), relation)
    need(["at the", "on the", "in the"], "a position ('at the top left') or a relation ('above a ...')")
    position = need(POSITIONS, "a position")
    if pos != len(words):
        raise fail("the end")
    return Scene((ShapeSpec(first.colour, first.shape, first.size, position),))


# ---------------------------------------------------------------------------------- random scenes


def random_scene(rng: np.random.Generator, n_objects: int = 1, split: str = "train") -> Scene:
    """A random scene; "train" uses only seen (colour, shape) pairs, "test" at least one HELD_OUT pair."""
    if split not in ("train", "test"):
        raise UserError(f"split: expected 'train' or 'test', got {split!r}")
    if n_objects not in (1, 2):
        raise UserError(f"n_objects: expected 1 or 2, got {n_objects!r}")
    pools = [_SEEN] * n_objects
    if split == "test":  # one object (either) from the held-out pairs, the other from any pair
        k = int(rng.integers(n_objects))
        pools = [_HELD if i == k else _PAIRS for i in range(n_objects)]
    while True:
        pairs = [pool[int(rng.integers(len(pool)))] for pool in pools]
        if n_objects == 1 or pairs[0] != pairs[1]:  # two identical objects make the relation ambiguous
            break
    sizes = list(SIZES)
    if n_objects == 1:
        (c, s), size = pairs[0], sizes[int(rng.integers(2))]
        return Scene((ShapeSpec(c, s, size, POSITIONS[int(rng.integers(len(POSITIONS)))]),))
    said = rng.random() < 0.5  # two-object captions name both sizes or neither
    objs = tuple(ShapeSpec(c, s, sizes[int(rng.integers(2))] if said else None) for c, s in pairs)
    return Scene(objs, RELATIONS[int(rng.integers(len(RELATIONS)))])


def eval_prompts(n: int, n_objects: int = 1, seen: bool = True, seed: int = 0) -> list[str]:
    """n captions of random scenes for evaluation: seen pairs only, or with an unseen (HELD_OUT) pair."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng, n_objects, "train" if seen else "test")) for _ in range(n)]


# ---------------------------------------------------------------------------------------- render


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) in box coordinates (box = [-0.5, 0.5]², v pointing down) lie in the shape."""
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 0.5) & (np.abs(u) <= (v + 0.5) / 2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= CROSS_HALF_WIDTH) & (av <= 0.5)) | ((av <= CROSS_HALF_WIDTH) & (au <= 0.5))
    raise UserError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def coverage(shape: str, box: tuple[float, float, float, float], window: tuple[int, int, int, int],
             supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` in box (cx, cy, w, h) over pixels window (x0, y0, x1, y1)."""
    cx, cy, bw, bh = box
    x0, y0, x1, y1 = window
    k = supersample  # k×k samples per pixel, averaged: rendering larger, then downsampling
    offs = (np.arange(k) + 0.5) / k
    u = ((np.arange(x0, x1)[:, None] + offs).ravel() - cx) / bw
    v = ((np.arange(y0, y1)[:, None] + offs).ravel() - cy) / bh
    hit = inside(shape, u[None, :], v[:, None])
    return hit.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3), dtype=np.float32)


def _place(rng: np.random.Generator, target: float, lo: float, hi: float, jitter: float) -> float:
    """A coordinate within [lo, hi], at most `jitter` from the target (first moved into [lo, hi])."""
    target = min(max(target, lo), hi)
    return float(rng.uniform(max(lo, target - jitter), min(hi, target + jitter)))


def layout(scene: Scene, image_size: int, rng: np.random.Generator) -> list[tuple[ShapeSpec, float, float, float]]:
    """Concrete placement (spec, cx, cy, side) in pixels; unsaid sizes and positions are drawn from rng."""
    W, unit = float(image_size), image_size / 32  # margins and jitter are tuned at 32 px
    margin = 0.5 * unit
    sizes = [o.size or list(SIZES)[int(rng.integers(2))] for o in scene.objects]
    sides = [W * SIZES[s] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) for s in sizes]
    if len(scene.objects) == 1:
        o, s = scene.objects[0], sides[0]
        row, col = divmod(POSITIONS.index(o.position) if o.position else int(rng.integers(9)), 3)
        edge = 1.5 * unit  # keep the centre this far inside its grid cell, so the position word is clear
        xy = []
        for cell in (col, row):
            lo, hi = max(s / 2 + margin, cell * W / 3 + edge), min(W - s / 2 - margin, (cell + 1) * W / 3 - edge)
            xy.append(_place(rng, (cell + 0.5) * W / 3, lo, hi, 2 * unit))
        return [(o, xy[0], xy[1], s)]
    # Two objects: side by side along the relation's axis with a gap (>= 2 px, so an empty pixel row
    # keeps them apart); across it nearly aligned, so the main-axis offset dominates the relation.
    sa, sb = sides
    gap = min(float(rng.uniform(2, 4.5)) * unit, W - 2 * margin - sa - sb)
    first_earlier = scene.relation in ("above", "to the left of")
    s1, s2 = (sa, sb) if first_earlier else (sb, sa)
    start = margin + float(rng.uniform(0, max(0.0, W - 2 * margin - (s1 + gap + s2))))
    main = [start + s1 / 2, start + s1 + gap + s2 / 2]
    if not first_earlier:
        main.reverse()
    half = max(sa, sb) / 2 + margin
    base = float(rng.uniform(half, W - half))
    across = [_place(rng, base, s / 2 + margin, W - s / 2 - margin, 1.5 * unit) for s in sides]
    vertical = scene.relation in ("above", "below")
    return [(o, a if vertical else m, m if vertical else a, s)
            for o, m, a, s in zip(scene.objects, main, across, sides)]


def render(scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the scene as uint8 (H, W, 3): anti-aliased shapes on BACKGROUND, with jittered place and size."""
    rng = rng if rng is not None else np.random.default_rng()
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUND
    for o, cx, cy, s in layout(scene, image_size, rng):
        x0, y0 = max(0, math.floor(cx - s / 2)), max(0, math.floor(cy - s / 2))
        x1, y1 = min(image_size, math.ceil(cx + s / 2)), min(image_size, math.ceil(cy + s / 2))
        a = coverage(o.shape, (cx, cy, s, s), (x0, y0, x1, y1))[..., None]
        patch = img[y0:y1, x0:x1]
        patch += a * (np.asarray(COLOURS[o.colour], np.float32) - patch)  # objects never overlap
    return (img + 0.5).astype(np.uint8)


def make_shapes(n: int, split: str = "train", seed: int = 0, image_size: int = 32,
                two_object_fraction: float = 0.3) -> tuple[torch.Tensor, list[str]]:
    """n images (uint8 N×3×H×W) and their captions; the first k of n are those of make_shapes(k)."""
    if n < 0 or image_size < 8:
        raise UserError(f"make_shapes: need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, image_size, image_size), np.uint8)
    captions = []
    for i in range(n):
        scene = random_scene(rng, 2 if rng.random() < two_object_fraction else 1, split)
        out[i] = render(scene, image_size, rng).transpose(2, 0, 1)
        captions.append(caption(scene))
    return torch.from_numpy(out), captions
