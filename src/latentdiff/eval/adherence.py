"""Model-free prompt adherence for the "shapes" data set: find the objects in an image, check the prompt.

Each pixel is explained as a blend of the dark background and one palette colour (the blend is how
anti-aliased and blurry edges look), so off-colour, noisy or soft images from a generator still read
correctly, while dim pixels (mostly background) are left out of the objects. Objects are connected
components per colour; shape is the template (rendered at the object's box, sharp or blurred) that
overlaps it best. The scorer is strict: wrong, missing or extra objects all fail `whole`.
Meant for images of 24 px or more: at 16 px a small shape is 4 px wide and shapes blur together.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from latentdiff.data.shapes import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, ShapeSpec, inside, parse_caption
from latentdiff.errors import UserError

_NAMES = list(COLOURS)
_DIRS = np.array([COLOURS[c] for c in _NAMES], np.float32) - np.array(BACKGROUND, np.float32)  # K×3
MIN_ALPHA = 0.5  # a pixel belongs to an object when at least half of it is the object's colour
MAX_RESIDUAL = 70.0  # RGB distance from the nearest blend line; farther pixels match no palette colour
NOISE_FLOOR = 0.1  # shares below this are noise on the background; they would swell small objects
MAX_BACKGROUND_SHIFT = 40.0  # per channel: a measured background farther from BACKGROUND is not trusted
MIN_AREA = 0.008  # components smaller than this fraction of the image are specks, not objects
MIN_IOU = 0.5  # a best template overlap below this means "no known shape"
MAX_EXTENT = 0.7  # boxes wider than this fraction of the image are not objects of the data set
SIZE_SPLIT = float(np.sqrt(SIZES["small"] * SIZES["large"]))  # box side / image side between the classes
BLUR_SIGMAS = (0.0, 0.5, 0.9, 1.3)  # a blurred square has round corners: compare it with blurred templates
# What every object of the data set is, checked so that near misses fail (eval/adversarial.py); each limit
# lies between degraded renderings of the data and the probes (benchmarks/results/scorer_calibration.md).
MAX_ASPECT = 1.35  # fitted width / height or its inverse: every box is square (renders <= 1.18, probes >= 2.3)
MIN_FILL = 0.75  # mean share over the template's interior: shapes are solid (renders >= 0.84, outlines ~0.6)
FILL_CORE = 0.9  # the interior: where the fitted (blurred) template is at least this share of its peak
TONE_RANGE = (0.7, 1.3)  # the core colour as a share of its palette colour: grey is half a white (0.5)
# RGB distance of the core colour from its palette colour's blend line: renders degraded hard reach 46; a
# colour halfway between two palette colours is >= 58 away, or too dim (tone < 0.7) if nearer
MAX_HUE = 50.0
KEYS = ("colour", "shape", "size", "position", "relation", "count", "whole")
Box = tuple[float, float, float, float]  # cx, cy, width, height in pixels


@dataclass(frozen=True)
class Detected:
    """One object found in an image: its words ("other" when nothing fits), its box in pixels, and the
    measures behind the words."""

    colour: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    width: float
    height: float
    area: int  # pixels in the component
    iou: float  # overlap with the best shape template
    aspect: float = 1.0  # fitted width / height (every shape of the data set has a square box)
    fill: float = 1.0  # how much of the best template's interior the object covers (1: solid)
    tone: float = 1.0  # the core colour's share of its palette colour (1: the palette colour itself)
    hue: float = 0.0  # RGB distance of the core colour from its palette colour's blend line


def _as_hwc(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise UserError(f"adherence: expected an RGB image (3, H, W) or (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise UserError(f"adherence: expected uint8 pixels, got {a.dtype}")
    return a.astype(np.float32)


def _components(colour: np.ndarray) -> np.ndarray:
    """8-connected components of equal colour index (-1: none); label = smallest pixel index in it."""
    h, w = colour.shape
    big = h * w
    pad = np.full((h + 2, w + 2), -1)
    pad[1:-1, 1:-1] = colour
    offsets = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    same = [(pad[dy : dy + h, dx : dx + w] == colour) & (colour >= 0) for dy, dx in offsets]
    lab = np.where(colour >= 0, np.arange(big).reshape(h, w), big)
    buf = np.full((h + 2, w + 2), big)
    while True:  # spread the minimum label to neighbours of the same colour until nothing changes
        buf[1:-1, 1:-1] = lab
        new = lab.copy()
        for (dy, dx), ok in zip(offsets, same):
            np.minimum(new, np.where(ok, buf[dy : dy + h, dx : dx + w], big), out=new)
        flat = np.append(new.ravel(), big)
        new = np.minimum(new, flat[new])  # pointer jump: take the label of my label's pixel (faster)
        if np.array_equal(new, lab):
            return np.where(colour >= 0, lab, -1)
        lab = new


def _background(img: np.ndarray) -> np.ndarray:
    """The image's background colour: the median pixel (objects cover well under half), if dark enough.

    Measuring it makes a colour cast that shifts every pixel harmless; an implausible one (a mostly
    grey image) falls back to BACKGROUND, so a grey image does not read as a dark background.
    """
    bg = np.array(BACKGROUND, np.float32)
    med = np.median(img.reshape(-1, 3), axis=0)
    return med if np.abs(med - bg).max() <= MAX_BACKGROUND_SHIFT else bg


def _position(cx: float, cy: float, w: int, h: int) -> str:
    col, row = min(2, max(0, int(3 * cx / w))), min(2, max(0, int(3 * cy / h)))
    return POSITIONS[3 * row + col]


def _core_colour(d: np.ndarray, alpha: np.ndarray, comp: np.ndarray, k: int) -> tuple[float, float]:
    """(tone, hue) of a component's core: the median colour of its brighter half, as a share of palette
    colour k along its blend line (tone) and its distance from that line (hue), background removed."""
    a = alpha[..., k][comp]
    c = np.median(d[comp][a >= np.median(a)], axis=0)
    tone = float(c @ _DIRS[k] / (_DIRS[k] ** 2).sum())
    return tone, float(np.linalg.norm(c - tone * _DIRS[k]))


def detect_objects(image: Any) -> list[Detected]:
    """The objects in a uint8 RGB image (3, H, W) or (H, W, 3), largest first."""
    img = _as_hwc(image)
    h, w, _ = img.shape
    d = img - _background(img)
    alpha = np.maximum(d @ _DIRS.T / (_DIRS**2).sum(1), 0)  # H×W×K: how much of each colour, if blended
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * _DIRS, axis=-1)
    best = resid.argmin(-1)
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    solid = (a_best >= MIN_ALPHA) & (resid.min(-1) <= MAX_RESIDUAL)
    found, owner = [], np.full((h, w), -1)
    lab = _components(np.where(solid, best, -1))
    roots, sizes = np.unique(lab[lab >= 0], return_counts=True)
    for root in roots[sizes >= MIN_AREA * h * w]:
        comp = lab == root
        owner[comp] = len(found)
        found.append((int(best.flat[root]), comp))
    out = []
    for i, (k, comp) in enumerate(found):
        ys, xs = np.nonzero(comp)
        x0, y0 = max(0, xs.min() - 2), max(0, ys.min() - 2)
        x1, y1 = min(w, xs.max() + 3), min(h, ys.max() + 3)
        # Soft mask: this colour's share of each pixel, including the dim edge, minus other objects.
        share = np.clip((alpha[y0:y1, x0:x1, k] - NOISE_FLOOR) / (1 - NOISE_FLOOR), 0, 1)
        soft = share * ((owner[y0:y1, x0:x1] == i) | ~solid[y0:y1, x0:x1])
        box = tuple(float(v) for v in _profile_box(soft))
        tone, hue = _core_colour(d, alpha, comp, k)
        colour = _NAMES[k] if TONE_RANGE[0] <= tone <= TONE_RANGE[1] and hue <= MAX_HUE else "other"
        if max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 > MAX_EXTENT * w:  # a wash, not an object
            out.append(Detected(colour, "other", "other", _position(box[0] + x0, box[1] + y0, w, h),
                                box[0] + x0, box[1] + y0, box[2], box[3], int(comp.sum()), 0.0, tone=tone, hue=hue))
            continue
        fit = _classify(soft, box)
        cx, cy, bw, bh = fit.box
        cx, cy = cx + x0, cy + y0
        aspect = bw / max(bh, 1e-6)
        ok = fit.iou >= MIN_IOU and abs(np.log(aspect)) <= np.log(MAX_ASPECT) and fit.fill >= MIN_FILL
        size = "small" if np.sqrt(bw * bh) / w < SIZE_SPLIT else "large"
        out.append(Detected(colour, fit.shape if ok else "other", size, _position(cx, cy, w, h), cx, cy, bw, bh,
                            int(comp.sum()), fit.iou, aspect, fit.fill, tone, hue))
    return sorted(out, key=lambda o: -o.area)


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n×n Gaussian blur as a matrix (zero padding, like the dark border), so stacks blur in one matmul."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    r = int(np.ceil(2.5 * sigma))
    dist = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (np.exp(-0.5 * (dist / sigma) ** 2) * (np.abs(dist) <= r) / kernel.sum()).astype(np.float32)


def _profile_box(t: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) of soft masks (..., H, W) from their max-profiles: sums give sub-pixel extents."""
    px, py = t.max(-2), t.max(-1)
    w, h = px.sum(-1), py.sum(-1)
    cx = (px * (np.arange(px.shape[-1]) + 0.5)).sum(-1) / np.maximum(w, 1e-6)
    cy = (py * (np.arange(py.shape[-1]) + 0.5)).sum(-1) / np.maximum(h, 1e-6)
    return np.stack([cx, cy, w, h], -1)


@dataclass(frozen=True)
class _Fit:
    shape: str
    iou: float
    box: Box  # blur-corrected (cx, cy, w, h) in the window
    fill: float


def _classify(soft: np.ndarray, box: Box) -> _Fit:
    """Best-overlapping shape (soft IoU) of templates sharp or blurred; its IoU, blur-corrected box and fill.

    Blur makes thin parts (a cross's arm ends, a triangle's apex, a circle's sides) fade, so the box
    measured from the image is too small for them; each template is therefore sized so that the
    same measurement on the blurred template gives the image's box. That fitted box is the
    object's size before the blur, so it decides small or large. Fill is the object's mean share over
    the template's interior (where the template is at least FILL_CORE of its peak): an outline or a
    ring overlaps a solid template well at its rim but leaves that interior empty.
    """
    h, w = soft.shape
    k = 3  # supersampling
    offs = (np.arange(k) + 0.5) / k
    xs, ys = (np.arange(w)[:, None] + offs).ravel(), (np.arange(h)[:, None] + offs).ravel()
    blur = [(_blur_matrix(h, sg), _blur_matrix(w, sg)) for sg in BLUR_SIGMAS]
    target = np.array(box, np.float32)

    def templates(shape: str, boxes: np.ndarray) -> np.ndarray:  # one box per blur -> blurs × H × W
        u = (xs[None, None, :] - boxes[:, 0, None, None]) / boxes[:, 2, None, None]
        v = (ys[None, :, None] - boxes[:, 1, None, None]) / boxes[:, 3, None, None]
        sharp = inside(shape, u, v).reshape(-1, h, k, w, k).mean(axis=(2, 4))
        return np.stack([bh @ t @ bw.T for (bh, bw), t in zip(blur, sharp)])

    fits = []  # (iou, shape, fitted box, fill) per shape
    for shape in SHAPES:
        first = np.repeat(target[None], len(blur), 0)
        seen = _profile_box(templates(shape, first))
        fitted = first.copy()
        fitted[:, :2] += target[:2] - seen[:, :2]
        fitted[:, 2:] *= target[2:] / np.maximum(seen[:, 2:], 1e-3)
        t = templates(shape, fitted)
        iou = np.minimum(soft, t).sum((-1, -2)) / np.maximum(np.maximum(soft, t).sum((-1, -2)), 1e-6)
        j = int(iou.argmax())
        core = t[j] >= FILL_CORE * t[j].max()
        fill = float(np.minimum(soft[core] / np.maximum(t[j][core], 1e-6), 1).mean()) if core.any() else 0.0
        fits.append((float(iou[j]), shape, tuple(float(x) for x in fitted[j]), fill))
    iou, shape, fitted_box, fill = max(fits)
    return _Fit(shape if iou >= MIN_IOU else "other", iou, fitted_box, fill)


def _match(spec: ShapeSpec, det: Detected | None) -> dict[str, bool]:
    """What one detection gets right about one prompt object (size and position only when said)."""
    said = {"size": spec.size, "position": spec.position}
    wanted = {"colour": spec.colour, "shape": spec.shape, **{k: v for k, v in said.items() if v is not None}}
    return {k: det is not None and getattr(det, k) == v for k, v in wanted.items()}


def _relation(a: Detected, b: Detected) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy  # the dominant axis decides: "above" means mostly above
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def match(image: Any, prompt: str) -> tuple[dict[str, bool], tuple[Detected, ...] | None]:
    """The scores of :func:`score` and the detections matched to the prompt's objects (None: no one-to-one match)."""
    scene = parse_caption(prompt)
    dets, specs = detect_objects(image), scene.objects
    if len(dets) != len(specs):  # missing or extra objects: no attribute is credited (clutter earns nothing)
        return {"count": False, "whole": False}, None
    best_key, best = None, None
    for combo in itertools.permutations(dets):
        m = [_match(s, d) for s, d in zip(specs, combo)]
        rel = scene.relation is not None and _relation(*combo) == scene.relation
        # Colour and shape identify an object; what else is right only breaks ties.
        key = (sum(2 * r["colour"] + 2 * r["shape"] for r in m), sum(sum(r.values()) for r in m), rel)
        if best_key is None or key > best_key:
            best_key, best = key, (m, rel, combo)
    m, rel, combo = best
    res = {k: all(r.get(k, True) for r in m) for k in dict.fromkeys(k for r in m for k in r)}  # unsaid: any
    if scene.relation:
        res["relation"] = rel
    res["count"] = True
    res["whole"] = all(res.values())
    return res, tuple(combo)


def score(image: Any, prompt: str) -> dict[str, bool]:
    """Which parts of the prompt the image shows: count, whole, and colour, shape and (where said) size,
    position, relation of the objects when the image holds exactly as many as the prompt names.

    `count` is true when the image holds exactly as many objects as the prompt names; only then are
    the prompt's objects matched one-to-one to the detected ones (the best colour + shape assignment)
    and their attributes scored. An extra or missing object fails `count` and `whole` and leaves the
    attributes unscored, so clutter (many blobs, one of which happens to fit) earns nothing. Keys for
    things the prompt does not say (a size, a position) are left out rather than counted as true.
    """
    return match(image, prompt)[0]


def adherence_report(images: Sequence[Any], prompts: Sequence[str], groups: Sequence[str] | None = None) -> dict:
    """Accuracy of count and whole over all prompts and of each attribute over the matched prompts that
    state it (the image holds exactly the named number of objects), overall and per group (default: object count)."""
    if len(images) != len(prompts):
        raise UserError(f"adherence_report: {len(images)} images but {len(prompts)} prompts")
    if groups is not None and len(groups) != len(prompts):
        raise UserError(f"adherence_report: {len(groups)} group names for {len(prompts)} prompts")
    scores = [score(img, p) for img, p in zip(images, prompts)]
    if groups is None:
        groups = ["1 object" if len(parse_caption(p).objects) == 1 else "2 objects" for p in prompts]

    def summary(rows: list[dict[str, bool]]) -> dict:
        acc = {k: float(np.mean([r[k] for r in rows if k in r])) for k in KEYS if any(k in r for r in rows)}
        return {"n": len(rows), "n_matched": sum(r["count"] for r in rows), "accuracy": acc}

    by_group = {g: summary([s for s, gg in zip(scores, groups) if gg == g]) for g in dict.fromkeys(groups)}
    return {**summary(scores), "groups": by_group, "scores": scores}


def format_table(report: dict) -> str:
    """Markdown table of a report: one row per group and one for all, accuracies in percent.

    "matched" is how many images held exactly the named number of objects: the attribute columns are
    rates over those only; count and whole are over all n.
    """
    rows = [*report["groups"].items(), ("all", report)]
    keys = [k for k in KEYS if any(k in r["accuracy"] for _, r in rows)]
    lines = ["| prompts | n | matched | " + " | ".join(keys) + " |", "|---|---:|---:|" + "---:|" * len(keys)]
    for name, r in rows:
        cells = [f"{100 * r['accuracy'][k]:.1f}" if k in r["accuracy"] else "–" for k in keys]
        lines.append(f"| {name} | {r['n']} | {r['n_matched']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
