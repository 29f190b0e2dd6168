"""Image files in: any PIL mode decoded to grey or RGB uint8 at one size (EXIF rotation, alpha, 16-bit, CMYK)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from latentdiff.data.transforms import resize_and_crop
from latentdiff.errors import UserError
from latentdiff.formats.paths import check_regular_file, not_a_regular_file


def read_image(source: Path | str | bytes, size: int | tuple[int, int] | None = None, channels: int | None = None,
               center_crop: bool = True, name: str | None = None) -> torch.Tensor:
    """One image file (or its bytes, called ``name`` in errors) as uint8 (C, H, W) at ``size`` (a side or
    (height, width); None: a square of the shorter side), channels None keeps grey grey."""
    label = name or ("image" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes):
        check_regular_file(source, "image file")  # a FIFO would block the read forever
    opened = (lambda: io.BytesIO(source)) if isinstance(source, bytes) else (lambda: source)
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened()) as img:
                channels = channels or (1 if _flatten_mode(img).mode == "L" else 3)
                size = size or min(img.size)
            return torch.from_numpy(decode_image(opened(), size, channels, center_crop).copy())
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a folder; expected an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UserError(f"{label}: cannot read image ({e})") from None


def image_file_problem(path: Path | str) -> str | None:
    """Why the file at ``path`` cannot be an image, judged cheaply; None when it looks readable.

    Its type first (``stat`` only: a FIFO, socket or device is never opened), then its header (format and
    size: decompression bombs) and, for PNG, every chunk's checksum (truncated or corrupt data) — no pixel
    is decoded. Every reader of image folders runs it on every file of both splits before decoding.
    """
    kind = not_a_regular_file(path)
    if kind is not None:
        return f"{kind}, not a regular file" if kind.startswith("a ") else kind
    try:
        with Image.open(path) as img:
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):  # PIL only warns below 2x
                raise Image.DecompressionBombError(f"{img.width}x{img.height} exceeds Image.MAX_IMAGE_PIXELS")
            if img.format == "PNG":
                img.verify()  # CRCs of all chunks: reads the file, inflates nothing
    except Exception as e:  # PIL raises many types on malformed files; all mean "bad file"
        return f"{type(e).__name__}: {e}".replace(str(path), Path(path).name)
    return None


def decode_image(path: Path | io.BytesIO, size: int | tuple[int, int], channels: int,
                 center_crop: bool) -> np.ndarray:
    """Decode one file to a (channels, height, width) uint8 array (``size``: a side or (h, w)); raises on any defect."""
    if not isinstance(path, io.BytesIO):
        check_regular_file(path, "image file")  # before opening: a FIFO named x.png would block forever
    with Image.open(path) as img:
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise Image.DecompressionBombError(f"{img.width}x{img.height} exceeds Image.MAX_IMAGE_PIXELS")
        h, w = (size, size) if isinstance(size, int) else size
        img.draft(img.mode, (w, h))  # JPEG only: decode at 1/2..1/8 scale when that suffices
        img.load()  # truncated or corrupt data fails here
        img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
        img = _flatten_mode(img).convert("L" if channels == 1 else "RGB")
        arr = np.asarray(resize_and_crop(img, size, center_crop), dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file's bytes as decode_image sees it (after EXIF rotation), once every pixel
    has been decoded: raises on any defect, as decode_image would."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise Image.DecompressionBombError(f"{img.width}x{img.height} exceeds Image.MAX_IMAGE_PIXELS")
            img.load()
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
            return (img.height, img.width) if turned else (img.width, img.height)


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF rotation from an image's header alone (nothing decoded); raises if unreadable."""
    with Image.open(io.BytesIO(data)) as img:
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
        return (img.height, img.width) if turned else (img.width, img.height)


def _flatten_mode(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 'L' or 'RGB': alpha composited on white, 16-bit scaled, CMYK via ICC."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # palettes and tRNS colour keys become a real alpha channel
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16-bit PNG/TIFF: PIL's convert("L") clips at 255; scale the full range instead.
        a = np.asarray(img).astype(np.float64)
        scale = 1 / 257 if mode.startswith("I") else (255.0 if a.max(initial=0) <= 1 else 1.0)
        return Image.fromarray((a * scale).round().clip(0, 255).astype(np.uint8), "L")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:  # print profiles need colour management; the naive formula gives washed-out colours
            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return img.convert("L" if mode == "1" else "RGB")  # 1, P, CMYK, YCbCr, LAB, HSV
