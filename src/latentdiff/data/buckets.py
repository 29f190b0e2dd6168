"""Aspect-ratio buckets (as Stable Diffusion fine-tuning tools use): a few (height, width) sizes within one
pixel budget; every image is cropped to the bucket nearest its aspect ratio, and a batch holds one bucket.

``data.buckets`` is "auto" (sizes at the aspect ratios of AUTO_ASPECTS, sides multiples of data.bucket_step,
area at most data.image_size²) or an explicit list "WxH,WxH,...".
"""

from __future__ import annotations

import math

import numpy as np

from latentdiff.errors import UserError

AUTO_ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


def parse_buckets(spec: str | None, image_size: int, step: int) -> list[tuple[int, int]]:
    """(height, width) of every bucket of data.buckets ``spec`` (empty for None), sorted by aspect ratio."""
    if spec is None:
        return []
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data.buckets: expected 'auto' or 'WxH,WxH,...', got {spec!r}")
    if spec.strip() == "auto":
        budget = image_size * image_size
        sizes = set()
        for aspect in AUTO_ASPECTS:
            w = int(math.sqrt(budget * aspect) // step) * step
            h = int(math.sqrt(budget / aspect) // step) * step
            if w >= step and h >= step:
                sizes.add((h, w))
        if not sizes:
            raise UserError(f"data.buckets=auto: data.bucket_step={step} is larger than data.image_size={image_size}")
    else:
        sizes = set()
        for part in spec.split(","):
            wh = part.strip().lower().split("x")
            if len(wh) != 2 or not all(s.strip().isdigit() and int(s) > 0 for s in wh):
                raise UserError(f"data.buckets: {part.strip()!r} is not a size; write WIDTHxHEIGHT, e.g. 64x48")
            sizes.add((int(wh[1]), int(wh[0])))
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[1]))


def nearest_buckets(widths: np.ndarray, heights: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """For each image, the bucket whose aspect ratio is nearest its own (in log scale; ties: the first)."""
    targets = np.log(np.array([w / h for h, w in buckets]))[None, :]
    out = np.empty(len(widths), np.int32)
    for s in range(0, len(widths), 1 << 16):  # in blocks: (images x buckets) floats for millions of images add up
        aspect = np.log(np.maximum(widths[s: s + (1 << 16)], 1) / np.maximum(heights[s: s + (1 << 16)], 1))
        out[s: s + (1 << 16)] = np.abs(aspect[:, None] - targets).argmin(axis=1)
    return out


def assign_buckets(widths: np.ndarray, heights: np.ndarray, buckets: list[tuple[int, int]],
                   min_images: int) -> np.ndarray:
    """Bucket index per image: the nearest aspect, except that a bucket with fewer than ``min_images`` (one
    batch) would never fill a batch, so its images move to the nearest bucket that keeps more."""
    ids = nearest_buckets(widths, heights, buckets)
    log_aspect = np.log(np.array([w / h for h, w in buckets]))
    while True:
        counts = np.bincount(ids, minlength=len(buckets))
        used = np.flatnonzero(counts)
        small = [b for b in used if counts[b] < min_images]
        if not small or len(used) == 1:
            return ids
        b = min(small, key=lambda k: (counts[k], k))  # the emptiest goes first
        others = [k for k in used if k != b]
        to = min(others, key=lambda k: (abs(log_aspect[k] - log_aspect[b]), -counts[k], k))
        ids[ids == b] = to
