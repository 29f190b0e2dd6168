"""Tests for latentdiff.data: embedded datasets, image folders, config validation, transforms."""

from __future__ import annotations

import io
import re
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import DataConfig, ImageData, load_dataset, random_hflip, to_uint8_image
from latentdiff.data.embedded import FASHION_MNIST_DIR
from latentdiff.data.source import in_test
from latentdiff.errors import UserError

GOOD = [
    "cats/grey.png", "cats/rgb.jpg", "cats/rgba.png",
    "dogs/palette.gif", "dogs/deep16.png", "dogs/cmyk.jpg", "dogs/upper.BMP", "dogs/photo.webp",
]  # fmt: skip
BAD = ["cats/garbage.png", "cats/empty.jpg", "dogs/truncated.png"]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_folder(root: Path, bad: bool = True) -> Path:
    """Class sub-folders with one image per PIL mode (and odd sizes), plus three broken files."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    rgb.convert("L").save(root / "cats/grey.png")
    rgb.save(root / "cats/rgb.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "cats/rgba.png")  # transparent -> white
    rgb.convert("P").save(root / "dogs/palette.gif")
    Image.fromarray(np.full((24, 24), 65535, np.uint16)).save(root / "dogs/deep16.png")  # I;16
    rgb.convert("CMYK").save(root / "dogs/cmyk.jpg")
    rgb.save(root / "dogs/upper.BMP")
    rgb.save(root / "dogs/photo.webp")
    (root / "dogs/notes.txt").write_text("not an image")  # ignored by extension
    (root / "cats/.hidden.png").write_bytes(b"junk")  # ignored: hidden
    if bad:
        (root / "cats/garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        (root / "cats/empty.jpg").write_bytes(b"")
        (root / "dogs/truncated.png").write_bytes(_png_bytes(rgb)[:300])
    assert not any(in_test(f) for f in GOOD + BAD), "fixture files must all be in the train split"
    return root


# ------------------------------------------------------------------------------------ embedded


def test_mnist5k() -> None:
    train = load_dataset(DataConfig(source="mnist5k"))
    test = load_dataset(DataConfig(source="mnist5k", split="test"))
    assert len(train) + len(test) == 5000 and 4400 < len(train) < 4600
    assert train.images.shape == (len(train), 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels is not None and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert train.class_names == [str(i) for i in range(10)]
    assert train.images.max() == 255 and train.images.min() == 0
    small = load_dataset(DataConfig(source="mnist5k", limit=50, channels=3))
    assert small.images.shape == (50, 3, 28, 28)
    assert torch.equal(small.images[:, 0], train.images[:50, 0])  # "first N" is deterministic
    assert small.labels is not None and len(small.labels.unique()) >= 8  # not sorted by class


def test_digits_resized() -> None:
    d = load_dataset(DataConfig(source="digits", image_size=16))
    assert d.images.shape == (len(d), 1, 16, 16) and 1500 < len(d) < 1797
    assert d.labels is not None and d.labels.max() == 9


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist() -> None:
    train = load_dataset(DataConfig(source="fashion-mnist"))
    test = load_dataset(DataConfig(source="fashion-mnist", split="test"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert test.labels is not None and test.labels.bincount().tolist() == [1000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset(DataConfig(source="fashion-mnist", fashion_mnist_dir=str(tmp_path)))
    assert str(tmp_path) in str(e.value)


def test_fashion_mnist_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LATENTDIFF_FASHION_MNIST_DIR is the default folder; data.fashion_mnist_dir still wins over it."""
    env, own = tmp_path / "env", tmp_path / "own"
    monkeypatch.setenv("LATENTDIFF_FASHION_MNIST_DIR", str(env))
    with pytest.raises(UserError, match="LATENTDIFF_FASHION_MNIST_DIR") as e:
        load_dataset(DataConfig(source="fashion-mnist"))
    assert str(env / "train-images-idx3-ubyte") in str(e.value)
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(source="fashion-mnist", fashion_mnist_dir=str(own)))
    assert str(own) in str(e.value) and str(env) not in str(e.value)


def test_fashion_mnist_bad_magic(tmp_path: Path) -> None:
    import gzip

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x02" + b"\x00" * 16)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: not an idx file"):
        load_dataset(DataConfig(source="fashion-mnist", fashion_mnist_dir=str(tmp_path)))


def test_batch_range_and_roundtrip() -> None:
    d = load_dataset(DataConfig(source="mnist5k", limit=64))
    x = d.batch(torch.arange(64))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 28, 28)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8_image(x), d.images)
    assert to_uint8_image(torch.tensor([-3.0, 0.0, 7.0])).tolist() == [0, 128, 255]


# --------------------------------------------------------------------------------- image folders


def test_folder_skip_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="latentdiff.data"):
        d = load_dataset(DataConfig(source=str(root), image_size=16, channels=3))
    assert d.files == sorted(GOOD)  # sorted relative paths, bad ones dropped
    assert d.images.shape == (len(GOOD), 3, 16, 16) and d.images.dtype == torch.uint8
    assert d.class_names == ["cats", "dogs"]
    assert d.labels is not None and d.labels.tolist() == [f.startswith("dogs") for f in d.files]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 " in warnings[0] and "cats/empty.jpg" in warnings[0]
    # Alpha composited on white; 16-bit full scale maps to 255.
    assert d.images[d.files.index("cats/rgba.png")].min() == 255
    assert d.images[d.files.index("dogs/deep16.png")].min() == 255


def test_folder_grey_and_plain_resize(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", bad=False)
    d = load_dataset(DataConfig(source=str(root), image_size=12, channels=1, center_crop=False, limit=3))
    assert d.images.shape == (3, 1, 12, 12) and d.files == sorted(GOOD)[:3]


def test_folder_fail_mode(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(UserError, match=r"empty\.jpg: cannot read image"):
        load_dataset(DataConfig(source=str(root), on_bad_file="fail"))


def test_folder_unlabelled_when_files_at_top(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", bad=False)
    Image.new("RGB", (8, 8), "red").save(root / "loose.png")
    d = load_dataset(DataConfig(source=str(root), channels=3, image_size=8))
    assert d.labels is None and d.class_names == [] and len(d) == len(GOOD) + 1


def test_folder_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("L", (8, 8)).save(root / "a.png")
    Image.new("L", (40, 40)).save(root / "b.png")  # 1600 pixels: over the limit, under 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with caplog.at_level(logging.WARNING):
        d = load_dataset(DataConfig(source=str(root)))
    assert d.files == ["a.png"] and "b.png" in caplog.text


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only_bad"])
def test_folder_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "data"
    if case == "file":
        path.write_bytes(b"x")
    elif case == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    elif case == "only_bad":
        path.mkdir()
        (path / "bad.png").write_bytes(b"nope")
    if case != "missing":
        assert path.exists()
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_dataset(DataConfig(source=str(path)))


def test_fingerprint(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", bad=False)
    cfg = DataConfig(source=str(root), image_size=16, channels=3)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert load_dataset(DataConfig(source=str(root), image_size=16, channels=3, hflip=True)).fingerprint == (
        a.fingerprint
    )  # batch-time settings do not change the data's identity
    img = Image.open(root / "cats/grey.png")
    img.putpixel((20, 15), 255 - img.getpixel((20, 15)))
    img.save(root / "cats/grey.png")
    assert load_dataset(cfg).fingerprint != a.fingerprint
    assert load_dataset(DataConfig(source="digits", limit=10)).fingerprint == (
        load_dataset(DataConfig(source="digits", limit=10)).fingerprint
    )


# ------------------------------------------------------------------------------ transforms, config


def test_random_hflip_deterministic() -> None:
    x = torch.arange(64 * 3 * 2 * 2, dtype=torch.float32).view(64, 3, 2, 2)
    a = random_hflip(x, torch.Generator().manual_seed(1))
    b = random_hflip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(64)]
    assert 10 < sum(flipped) < 54  # roughly half, and each sample either flipped or left alone
    assert all(f or torch.equal(a[i], x[i]) for i, f in enumerate(flipped))


def test_batch_is_the_stored_pixels_in_minus_one_to_one() -> None:
    """batch() maps the chosen images to [-1, 1], in the order asked, and never flips (the caller augments)."""
    pixels = torch.arange(16 * 3 * 2 * 2).view(16, 3, 2, 2).to(torch.uint8)  # every image differs, none symmetric
    d = ImageData(pixels, None, [], "", "test")
    idx = torch.tensor([5, 0, 15, 5])
    expected = pixels[idx].float() / 127.5 - 1.0  # 0 -> -1, 255 -> 1
    assert torch.equal(d.batch(idx), expected)
    first_row = d.batch(torch.tensor([15]))[0, 0, 0]  # image 15, channel 0, top row: pixels 180 (left), 181
    torch.testing.assert_close(first_row, torch.tensor([180 / 127.5 - 1, 181 / 127.5 - 1]))
    ends = ImageData(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2), None, [], "", "test")
    assert ends.batch(torch.tensor([0])).flatten().tolist() == [-1.0, 1.0]


def test_every_embedded_name_has_a_source() -> None:
    """The names DataConfig accepts as embedded are exactly the registry's (any other source is a folder)."""
    from latentdiff.data.config import EMBEDDED
    from latentdiff.data.datasets import SOURCES

    assert sorted(SOURCES) == sorted(EMBEDDED)


def test_config_dict() -> None:
    cfg = DataConfig(source="digits", image_size=32, channels=3, limit=10)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="imagesize"):
        DataConfig.from_dict({"source": "digits", "imagesize": 32})
    for key, value in [("channels", 2), ("image_size", 0), ("split", "val"), ("limit", 0),
                       ("on_bad_file", "ignore"), ("hflip", "yes"), ("image_size", True)]:  # fmt: skip
        with pytest.raises(UserError, match=f"data.{key}"):
            DataConfig.from_dict({key: value})


def test_resize_and_crop_to_another_aspect_ratio():
    from PIL import Image

    from latentdiff.data.transforms import resize_and_crop

    a = np.zeros((40, 100), np.uint8)  # 100 wide, 40 high; a bright band in the middle 60 columns
    a[:, 20:80] = 255
    out = np.asarray(resize_and_crop(Image.fromarray(a), (20, 30)))  # (height, width): the crop is 60 x 40
    assert out.shape == (20, 30) and out[:, 1:-1].min() > 250  # the band fills the crop: the sides were cut off
    assert out.min() > 200  # the outermost columns only feel the resampling filter's tail
    assert np.asarray(resize_and_crop(Image.fromarray(a), 20)).shape == (20, 20)
