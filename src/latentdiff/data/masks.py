"""Inpainting masks: random ones for training (1 = region to repaint), as Stable Diffusion inpainting drew
them, and mask files for inference (white = redraw).

SD inpainting trained on synthetic masks and masked the whole image in 25 % of cases (its model card);
here a mask is the whole image with probability ``full_prob``, else a box or a few thick brush strokes.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from latentdiff.errors import UserError
from latentdiff.formats.paths import check_regular_file


def random_masks(n: int, size: int, generator: torch.Generator, full_prob: float = 0.25) -> torch.Tensor:
    """(n, 1, size, size) float masks of 0 and 1 (1 = repaint): whole image, a box, or 1–3 strokes."""
    out = torch.zeros(n, 1, size, size)
    u = torch.rand(n, 12, generator=generator).tolist()  # every random number of every mask, from one generator
    for i, r in enumerate(u):
        if r[0] < full_prob:
            out[i] = 1.0
        elif r[1] < 0.5:  # a box of 1/4 to 3/4 of the side in each direction
            h, w = (int(size * (0.25 + 0.5 * v)) for v in r[2:4])
            y, x = int(r[4] * (size - h + 1)), int(r[5] * (size - w + 1))
            out[i, 0, y:y + h, x:x + w] = 1.0
        else:
            out[i, 0] = torch.from_numpy(_strokes(size, r[2:]))
    return out


def _strokes(size: int, r: list[float]) -> np.ndarray:
    """1–3 straight strokes of width size/8..size/4, with round ends, from 10 numbers in [0, 1)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    width = max(1, round(size * (0.125 + 0.125 * r[0])))
    x, y = r[1] * size, r[2] * size
    for k in range(1 + int(r[3] * 3)):
        angle, length = 2 * math.pi * r[4 + k], size * (0.3 + 0.4 * r[7 + k % 3])
        x2, y2 = x + length * math.cos(angle), y + length * math.sin(angle)
        draw.line([(x, y), (x2, y2)], fill=255, width=width)
        for px, py in ((x, y), (x2, y2)):
            draw.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=255)
        x, y = x2, y2
    return (np.asarray(img) > 127).astype(np.float32)


def read_mask(source: Path | str | bytes, size: int | tuple[int, int], name: str | None = None) -> torch.Tensor:
    """A mask image (a file or its bytes) as an (H, W) keep-mask at ``size`` (a side or (H, W)): 1 = keep,
    0 = redraw (white in the file)."""
    label = name or ("mask" if isinstance(source, bytes) else f"mask {source}")
    h, w = (size, size) if isinstance(size, int) else size
    if not isinstance(source, bytes):
        check_regular_file(source, "mask file")  # a FIFO would block the read forever
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = im.convert("L")
            if im.size != (w, h):
                warnings.warn(f"{label} is {im.size[0]}x{im.size[1]}, resized to {w}x{h}", stacklevel=2)
                im = im.resize((w, h), Image.Resampling.NEAREST)
            a = np.asarray(im)
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{label}: cannot read image ({e})") from None
    if not np.isin(a, (0, 255)).all():
        warnings.warn(f"{label} is not black and white; thresholded at 50 %", stacklevel=2)
    keep = torch.from_numpy((a < 128).astype(np.float32))
    if keep.all():
        raise UserError(f"{label} marks nothing to redraw (paint the region to redraw white)")
    return keep
