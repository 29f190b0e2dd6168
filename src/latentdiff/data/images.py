"""Images out: grids and PNG files that carry their generation settings in their metadata."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiff.formats.checkpoint import atomic_write

PNG_KEY = "latentdiff"  # tEXt chunk holding the settings as JSON


def to_pil(img: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor with C in {1, 3} as a PIL image."""
    arr = img.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile a uint8 (N, C, H, W) batch into one image, ``nrow`` per row (default: about square)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return to_pil(grid)


def save_png(image: Image.Image, path: Path | str, settings: dict[str, Any] | None = None) -> None:
    """Write a PNG atomically, with ``settings`` as JSON in its metadata (read back by read_png_settings)."""
    info = PngInfo()
    if settings:
        info.add_text(PNG_KEY, json.dumps(settings, sort_keys=True))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_settings(path: Path | str) -> dict[str, Any]:
    """The settings a latentdiff PNG was generated with ({} if it has none)."""
    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
    return json.loads(text) if text else {}


def upscale_nearest(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Enlarge small images by an integer factor so grids of 28-px digits are visible."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return images.repeat_interleave(factor, -1).repeat_interleave(factor, -2) if factor > 1 else images




def captioned_rows(images: torch.Tensor, captions: list[str], ncols: int, pad: int = 2) -> Image.Image:
    """A grid of ``len(captions)`` rows of ``ncols`` images each, every row's caption written on its left."""
    from PIL import ImageDraw, ImageFont

    if len(images) != len(captions) * ncols:
        raise ValueError(f"{len(images)} images for {len(captions)} rows of {ncols}")
    grid = make_grid(images, ncols, pad).convert("RGB")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textbbox((0, 0), c, font=font)[2] for c in captions) + 2 * pad
    canvas = Image.new("RGB", (text_w + grid.width, grid.height), (255, 255, 255))
    canvas.paste(grid, (text_w, 0))
    draw, row_h = ImageDraw.Draw(canvas), images.shape[-2] + pad
    for r, c in enumerate(captions):
        draw.text((pad, pad + r * row_h + row_h // 2 - 6), c, font=font, fill=(0, 0, 0))
    return canvas
