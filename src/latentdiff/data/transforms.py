"""Image transforms: resizing on load (PIL), flips and conversions on tensors at batch time."""

from __future__ import annotations

import torch
from PIL import Image


def resize_and_crop(img: Image.Image, size: int | tuple[int, int], center_crop: bool = True) -> Image.Image:
    """Resize to ``size`` (a side, or (height, width)): the largest centred crop of that aspect ratio, or a
    plain (aspect-changing) resize."""
    w, h = img.size
    th, tw = (size, size) if isinstance(size, int) else size
    if center_crop:
        cw, ch = min(w, h * tw / th), min(h, w * th / tw)  # the largest box of the target's aspect ratio
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    else:
        box = (0.0, 0.0, float(w), float(h))
    if (w, h) == (tw, th):
        return img
    if box[2] - box[0] == tw and box[3] - box[1] == th and box[0] % 1 == 0 and box[1] % 1 == 0:
        return img.crop(tuple(int(b) for b in box))  # already the right scale: crop only
    # One resample from the crop box (no intermediate image); LANCZOS to shrink, BICUBIC to grow.
    # reducing_gap first shrinks large photos by integer factors, much faster at equal quality.
    shrink = box[2] - box[0] > tw or box[3] - box[1] > th
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return img.resize((tw, th), resample, box=box, reducing_gap=3.0 if shrink else None)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample of an (N, C, H, W) batch left-right with probability 1/2."""
    return apply_hflip(x, hflip_coins(x.shape[0], generator))


def hflip_coins(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n fair coins (bool): which samples :func:`apply_hflip` mirrors."""
    # The coin flips come from `generator` on the CPU, so they do not depend on the data's device.
    return torch.rand(n, generator=generator) < 0.5


def apply_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples of an (N, C, H, W) batch where ``flip`` (bool (N,)) is set."""
    flip = flip.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flip, x.flip(-1), x)


def from_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """Map uint8 images in [0, 255] to floats in [-1, 1] (the range every model here works in)."""
    return x.float().div(127.5).sub(1.0)


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 in [0, 255], clamping out-of-range values."""
    # Exact inverse of from_uint8_image for values that came from uint8.
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of (N, C, H, W) images in [-1, 1] to size x size (antialiased when shrinking), clamped."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                                        antialias=shrink)
    return y.clamp(-1, 1)  # bicubic overshoots at edges; images live in [-1, 1]
