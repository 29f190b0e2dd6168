"""Bad-input suite: generate a corpus of broken inputs and run every one through the real CLI.

    nice -n 10 python benchmarks/bad_inputs.py

The corpus is made by code, never picked by hand: truncated, corrupt and zero-byte PNG/JPEG files,
decompression-bomb headers, 16-bit and CMYK images, captions in latin-1 and UTF-16, folders of non-images,
truncated and bit-flipped safetensors in model folders and checkpoints, a pickle that would create a
marker file if anything unpickled it, configs with wrong types and unknown keys, and absurd command-line
values; and output paths that cannot be written, wrong JSON types in every file read
back, command-line bytes invalid in the locale's encoding, sizes beyond memory, FIFOs, sockets and devices
where files are read, and bad files in the held-out split. Each case states its expected outcome:

- ``error``: exit code 2 and exactly one line on stderr, ``error: ...``, naming the needle (file, key
  or value); no traceback;
- ``skip``: exit code 0 and a warning that counts the skipped files (data.on_bad_file=skip, documented
  in the README, "Image folders");
- ``ok``: a valid but unusual input (16-bit, CMYK) that is read correctly, exit code 0.

Every case also runs within a time bound, leaves no temporary file, never reaches the CLI's last-resort
handler (which turns an unforeseen exception into one line: a bug, not an answer), and an ``error`` case
creates no file at all. Most cases run in this process through the CLI's entry point (``latentdiff.cli.main``,
which turns errors into exit codes exactly as the command does); cases marked ``subprocess`` run as
``python -m latentdiff``. Writes benchmarks/results/bad_inputs.md and .json; tests/test_bad_inputs.py
runs the same corpus.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentdiff.cli.app import LAST_RESORT

ROOT = Path(__file__).resolve().parents[1]
TIME_BOUND = 120.0  # seconds any case may take (a hang fails the case)
OUT = Path("@OUT@")  # stands for a case's own output folder in the arguments below
TINY = ["data.limit=32", "train.grid_samples=2", "train.grid_steps=2", "train.log_every=1"]


@dataclass
class Case:
    """One bad input and what must happen to it."""

    name: str
    group: str
    argv: list[str]
    expect: str  # "error", "skip" or "ok"
    needle: str = ""  # must appear in the error (or skip warning)
    subprocess: bool = False
    lines: int | None = None  # "ok" cases: exactly this many lines on stderr (no library's chatter beside ours)


@dataclass
class Outcome:
    """What a case did."""

    name: str
    group: str
    expect: str
    code: int | None
    seconds: float
    stderr: str
    problems: list[str]

    @property
    def passed(self) -> bool:
        """True when the case met every rule."""
        return not self.problems


class _Hang(BaseException):
    """Raised by the timer in a case that ran past TIME_BOUND (BaseException: no `except Exception` eats it)."""


# ------------------------------------------------------------------------------------ the corpus


def _noise(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's size) over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _flip_bits(data: bytes, start: int, end: int, n: int, seed: int) -> bytes:
    rng, b = random.Random(seed), bytearray(data)
    for _ in range(n):
        i = rng.randrange(start, end)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def bad_images() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected outcome) for single image files."""
    png, jpeg = _png_bytes(_noise()), _jpeg_bytes(_noise())
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    jpeg_zero_width = jpeg[: sof + 7] + b"\0\0" + jpeg[sof + 9:]
    grad16 = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in print colours
    return {
        "truncated.png": (png[: len(png) * 6 // 10], "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error"),
        "corrupt_idat.png": (_flip_bits(png, png.index(b"IDAT") + 8, len(png) - 16, 40, 1), "error"),
        "corrupt_header.jpg": (jpeg_zero_width, "error"),
        "zero_bytes.png": (b"", "error"),
        "zero_bytes.jpg": (b"", "error"),
        "bomb_60000x60000.png": (_png_header_only(60000, 60000), "error"),  # > 2x PIL's limit: refused at open
        "bomb_10000x10000.png": (_png_header_only(10000, 10000), "error"),  # 1-2x the limit: PIL only warns
        "text_named.png": (b"this is not an image\n", "error"),
        "html_named.jpg": (b"<html><body>404 Not Found</body></html>\n", "error"),
        "grey16.png": (_png_bytes(Image.frombytes("I;16", (32, 32), grad16.astype("<u2").tobytes())), "ok"),
        "cmyk.jpg": (_jpeg_bytes(cmyk), "ok"),
    }


class Evil:
    """Unpickling this creates the marker file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


SUBPROCESS_CASES = ("img2img truncated.png", "config latin1.yaml", "sample model folder: header_bit_flips",
                    "sample evil.ckpt", "sample --seed -1", "train folder of good and all bad files, on_bad_file=skip")


def make_corpus(root: Path, model: Path, run: Path, in_subprocess: tuple[str, ...] = SUBPROCESS_CASES,
                text_model: Path | None = None) -> list[Case]:
    """Write the corpus under ``root`` and return its cases. ``model`` is a trained model folder and ``run``
    the run folder that made it (`latentdiff train digits-tiny`), both left untouched; ``text_model`` a
    text-conditional one (`train_tiny_text_model`; None leaves out the cases that need prompts);
    ``root/marker`` must never appear. The cases named in ``in_subprocess`` also run once more as a real
    process. Call :func:`release` on ``root`` when done (it may hold an immutable folder and a mount)."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    out = OUT  # each case writes to its own root/out/NNN (so that a run folder never carries over)

    def case(name, group, argv, expect="error", needle="", sub=False, lines=None):
        own = root / "out" / f"{len(cases):03d}"
        argv = [str(own) if a is OUT else str(a).replace(str(OUT), str(own)) for a in argv]
        cases.append(Case(name, group, argv, expect, needle, sub, lines))

    good = root / "good.png"
    good.write_bytes(_png_bytes(_noise(16, 5)))
    images = bad_images()
    train_folder = ["train", "digits-tiny", *TINY, "data.image_size=16", "--steps", "1", "--out", out]

    # Image files: as img2img input, as inpaint mask, and alone among good images in a training folder.
    all_bad = root / "folder_all_bad_files"
    for name, (data, expect) in images.items():
        path = root / "images" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        folder = root / f"folder_{name.replace('.', '_')}"
        folder.mkdir()
        for i in range(4):
            (folder / f"good{i}.png").write_bytes(_png_bytes(_noise(16, i)))
        (folder / name).write_bytes(data)
        (all_bad / "bad").mkdir(parents=True, exist_ok=True)
        (all_bad / "bad" / name).write_bytes(data)
        needle = name if expect == "error" else ""
        case(f"img2img {name}", "image files", ["img2img", model, path, "--steps", 2, "--n-samples", 1,
                                                "--out", out], expect, needle)
        case(f"train folder with {name}, on_bad_file=fail", "image files",
             [*train_folder, f"data.source={folder}", "data.on_bad_file=fail"], expect, needle)
    for i in range(6):
        (all_bad / "good" / f"{i}.png").parent.mkdir(exist_ok=True)
        (all_bad / "good" / f"{i}.png").write_bytes(_png_bytes(_noise(16, 10 + i)))
    case("train folder of good and all bad files, on_bad_file=skip", "image files",
         [*train_folder, f"data.source={all_bad}", "data.captions=ignore"], "skip", "unreadable image file(s); first:")
    case("inpaint mask truncated.png", "image files",
         ["inpaint", model, good, root / "images" / "truncated.png", "--steps", 2, "--n-samples", 1, "--out", out],
         "error", "truncated.png")
    black = root / "mask_black.png"
    Image.new("L", (16, 16), 0).save(black)
    case("inpaint mask that marks nothing", "image files",
         ["inpaint", model, good, black, "--steps", 2, "--n-samples", 1, "--out", out], "error", "marks nothing")

    # Data folders.
    nonimages = root / "folder_of_non_images"
    nonimages.mkdir()
    for name, data in [("notes.txt", b"hello"), ("table.csv", b"a,b\n1,2\n"), ("blob.bin", os.urandom(64)),
                       ("script.py", b"print(1)\n")]:
        (nonimages / name).write_bytes(data)
    only_bad = root / "folder_only_bad_images"
    only_bad.mkdir()
    for name in ("truncated.png", "zero_bytes.jpg", "text_named.png"):
        (only_bad / name).write_bytes(images[name][0])
    (root / "empty_folder").mkdir()
    case("data folder of non-images", "data folders", [*train_folder, f"data.source={nonimages}"], "error",
         "no image files")
    case("data folder of only bad images", "data folders", [*train_folder, f"data.source={only_bad}"], "error",
         "no decodable images")
    case("empty data folder", "data folders", [*train_folder, f"data.source={root / 'empty_folder'}"], "error",
         "no image files")
    case("data.source is a file", "data folders", [*train_folder, f"data.source={good}"], "error", "is a file")
    case("data.source does not exist", "data folders", [*train_folder, f"data.source={root / 'nowhere'}"],
         "error", "no such folder")

    # Captions in the wrong encoding or shape.
    def captioned(name: str, files: dict[str, bytes]) -> Path:
        folder = root / name
        folder.mkdir()
        for i in range(4):
            (folder / f"{i}.png").write_bytes(_png_bytes(_noise(16, 20 + i)))
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        return folder

    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a café number {i}"}, ensure_ascii=False) for i in range(4)]
    meta = "\n".join(lines) + "\n"
    for label, folder, needle in [
        ("metadata.jsonl in latin-1", captioned("captions_latin1", {"metadata.jsonl": meta.encode("latin-1")}),
         "metadata.jsonl:1: not valid UTF-8"),
        ("metadata.jsonl in UTF-16", captioned("captions_utf16", {"metadata.jsonl": meta.encode("utf-16")}),
         "metadata.jsonl:1: not valid UTF-8"),
        ("sidecar .txt in latin-1", captioned("captions_txt_latin1",
                                              {f"{i}.txt": f"crème brûlée {i}".encode("latin-1") for i in range(4)}),
         "0.txt:1: not valid UTF-8"),
        ("metadata.jsonl with a malformed line", captioned("captions_malformed",
                                                           {"metadata.jsonl": (meta + "{oops\n").encode()}),
         "metadata.jsonl:5: malformed JSON"),
        ("metadata.jsonl naming a missing image", captioned("captions_missing", {"metadata.jsonl": (
            meta + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n").encode()}), "gone.png"),
        ("metadata.jsonl with a number as caption", captioned("captions_number", {"metadata.jsonl": "\n".join(
            json.dumps({"file_name": f"{i}.png", "text": i}) for i in range(4)).encode()}), "must be a string"),
    ]:
        case(label, "captions", [*train_folder, f"data.source={folder}", "data.channels=3"], "error", needle)

    # Model folders with broken weights or configs (copies of the good one).
    def broken_model(name: str, damage) -> Path:
        folder = root / f"model_{name}"
        shutil.copytree(model, folder)
        damage(folder)
        return folder

    weights = (model / "unet" / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", weights[:8])[0]

    def put(rel: str, data: bytes):
        return lambda folder: (folder / rel).write_bytes(data)

    nan_weights = bytearray(weights)
    nan_weights[8 + header_len: 8 + header_len + 4096] = b"\xff" * 4096  # all-ones floats are NaN
    for name, damage, needle in [
        ("truncated_half", put("unet/model.safetensors", weights[: len(weights) // 2]), "model.safetensors"),
        ("truncated_5_bytes", put("unet/model.safetensors", weights[:5]), "model.safetensors"),
        ("zero_bytes", put("unet/model.safetensors", b""), "model.safetensors"),
        ("header_bit_flips", put("unet/model.safetensors", _flip_bits(weights, 8, 8 + header_len, 12, 2)),
         "model.safetensors"),
        ("header_length_huge", put("unet/model.safetensors", struct.pack("<Q", 2**60) + weights[8:]),
         "model.safetensors"),
        ("pickle_as_safetensors", put("unet/model.safetensors", pickle.dumps({"w": Evil(root / "marker")})),
         "model.safetensors"),
        ("nan_weights", put("unet/model.safetensors", bytes(nan_weights)), "non-finite"),
        ("manifest_not_json", put("model_index.json", b"{\"format\": \"latentdiff\", "), "model_index.json"),
        ("manifest_other_format", put("model_index.json", b"{\"format\": \"diffusers\", \"version\": 1}"),
         "unsupported format"),
        ("manifest_null", put("model_index.json", b"null"), "model_index.json: expected a JSON object"),
        ("manifest_image_size_string", lambda f: _edit_json(f / "model_index.json", image_size="16"),
         "model_index.json: image_size"),
        ("manifest_guidance_list", lambda f: _edit_json(f / "model_index.json", conditioning={"kind": "none",
                                                                                              "guidance": [4]}),
         "conditioning.guidance"),
        ("unet_config_not_object", put("unet/config.json", b"[1, 2]"), "unet/config.json"),
        ("unet_config_wrong_type", lambda f: _edit_json(f / "unet" / "config.json", model_channels="many"),
         "model_channels"),
        ("unet_config_unknown_key", lambda f: _edit_json(f / "unet" / "config.json", model_chanels=16),
         "model_chanels"),
        ("unet_config_other_shape", lambda f: _edit_json(f / "unet" / "config.json", model_channels=32),
         "shape mismatch"),
        ("unet_folder_missing", lambda f: shutil.rmtree(f / "unet"), "unet"),
    ]:
        folder = broken_model(name, damage)
        case(f"sample model folder: {name}", "model folders", ["sample", folder, "--steps", 2, "--n-samples", 1,
                                                                "--out", out], "error", needle)

    # Checkpoints of a run folder (train --resume).
    def broken_run(name: str, damage) -> Path:
        folder = root / f"run_{name}"
        shutil.copytree(run, folder)
        latest = json.loads((folder / "checkpoints" / "latest.json").read_text())["checkpoint"]
        damage(folder / "checkpoints", folder / "checkpoints" / latest)
        return folder

    ck_weights = next(p for p in sorted(run.glob("checkpoints/step_*/model.safetensors"))).read_bytes()
    for name, damage, needle in [
        ("truncated_model", lambda c, s: (s / "model.safetensors").write_bytes(ck_weights[:1000]), "model.safetensors"),
        ("bit_flipped_header", lambda c, s: (s / "ema.safetensors").write_bytes(
            _flip_bits(ck_weights, 8, 60, 6, 3)), "ema.safetensors"),
        ("state_json_truncated", lambda c, s: (s / "state.json").write_text('{"step": 2, "optim'), "state.json"),
        ("latest_json_points_nowhere", lambda c, s: (c / "latest.json").write_text(
            '{"checkpoint": "step_00000099", "step": 99}'), "step_00000099"),
        ("latest_json_not_json", lambda c, s: (c / "latest.json").write_bytes(b"\xff\xfe\x00"), "latest.json"),
    ]:
        folder = broken_run(name, damage)
        case(f"train --resume: {name}", "checkpoints",
             ["train", "digits-tiny", *TINY, "--out", folder, "--steps", 4, "--resume"], "error", needle)

    # A pickle that runs code if loaded: nothing may unpickle it.
    evil = root / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil(root / "marker")}))
    shutil.copy(evil, root / "evil.pt")
    case("sample evil.ckpt", "pickles", ["sample", evil, "--out", out], "error", "evil.ckpt")
    case("eval with inception:evil.pt", "pickles",
         ["eval", model, "--n-samples", 10, "--features", f"inception:{root / 'evil.pt'}"], "error", "evil.pt")
    from latentdiff.cli import cli

    if "convert" in cli.commands:  # Stable Diffusion checkpoints (issue 6)
        case("convert evil.ckpt", "pickles", ["convert", evil, out], "error", "evil.ckpt")
    if any(p.name == "model" for p in cli.commands["sample"].params):
        case("sample --model evil.ckpt", "pickles", ["sample", "--model", evil, "--out", out], "error", "evil.ckpt")

    # Config files and overrides.
    configs = {
        "wrong_type.yaml": ("train:\n  steps: many\n", "train.steps"),
        "unknown_key.yaml": ("train:\n  learning_rate: 0.1\n", "learning_rate"),
        "unknown_section.yaml": ("trainer:\n  steps: 3\n", "trainer"),
        "top_level_list.yaml": ("- train\n- steps\n", "mapping"),
        "bad_syntax.yaml": ("train: [steps: 3\n", "not valid YAML"),
        "section_is_number.yaml": ("train: 5\n", "train"),
        "nested_wrong_type.yaml": ("unet:\n  channel_mult: 2\n", "channel_mult"),
        "latin1.yaml": ("# caf\xe9\ntrain:\n  steps: 3\n".encode("latin-1"), "latin1.yaml"),
        "utf16.yaml": ("train:\n  steps: 3\n".encode("utf-16"), "utf16.yaml"),
        "binary.yaml": (bytes(range(256)) * 4, "binary.yaml"),
    }
    for name, (text, needle) in configs.items():
        path = root / "configs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        case(f"config {name}", "configs", ["train", path, "--out", out], "error", needle)
    case("config path is a folder", "configs", ["train", root / "configs", "--out", out], "error", "neither a preset")
    for override, needle in [
        ("train.steps=many", "train.steps"), ("train.lr=nan", "train.lr"), ("train.lr=-1", "train.lr"),
        ("train.lr=.inf", "train.lr"), ("train.batch_size=0", "train.batch_size"), ("train.seed=-1", "train.seed"),
        ("train.seed=1e40", "train.seed"), ("train.steps=1e30", "train.steps"), ("train.ema_decay=2", "ema_decay"),
        ("train.time_limit=-1", "time_limit"), ("data.image_size=0", "data.image_size"),
        ("data.image_size=100000", "data.image_size"), ("data.channels=2", "data.channels"),
        ("data.limit=0", "data.limit"), ("unet.model_channels=-4", "model_channels"),
        ("unet.num_heads=0", "num_heads"), ("unet.channel_mult=[]", "channel_mult"),
        ("diffusion.num_timesteps=0", "num_timesteps"), ("diffusion.schedule=quadratic", "quadratic"),
        ("train.no_such_key=1", "no_such_key"), ("nosection.key=1", "nosection"), ("lr=3", "section.key=value"),
        ("train.lr", "section.key=value"), ("cond.guidance=nan", "cond.guidance"),
    ]:
        case(f"override {override}", "configs", ["train", "digits-tiny", override, "--out", out], "error", needle)

    # Absurd command-line values.
    s = ["sample", model, "--out", out, "--n-samples", 1]
    for args, needle in [
        (["--steps", 0], "--steps"), (["--steps", -3], "--steps"),
        (["--steps", 100000, "--sampler", "ddim"], "steps"),  # σ grids (the default's karras) take any count
        (["--n-samples", 0], "--n-samples"), (["--batch-size", -1], "--batch-size"), (["--seed", -1], "--seed"),
        (["--seed", 2**64], "--seed"), (["--seed", "abc"], "--seed"), (["--sampler", "plms"], "plms"),
        (["--spacing", "sideways"], "sideways"), (["--eta", -1], "--eta"), (["--eta", "nan"], "eta"),
        (["--guidance", "nan"], "guidance"), (["--guidance", -2], "guidance"), (["--guidance", "inf"], "guidance"),
        (["--class-label", 3], "class"), (["--prompt", "a cat"], "prompt"), (["--device", "toaster"], "toaster"),
        (["--device", "cuda:7"], "cuda"), (["--steps", "1e9"], "--steps"), (["--bogus-option"], "--bogus-option"),
    ]:
        case(f"sample {' '.join(map(str, args))}", "command line", [*s, *args], "error", needle)
    i2i = ["img2img", model, good, "--out", out, "--n-samples", 1, "--steps", 2]
    for args, needle in [(["--strength", 2], "--strength"), (["--strength", "nan"], "strength"),
                         (["--strength", -0.1], "--strength")]:
        case(f"img2img {' '.join(map(str, args))}", "command line", [*i2i, *args], "error", needle)
    case("img2img input is a folder", "command line", ["img2img", model, root, "--out", out], "error", str(root))
    case("img2img input does not exist", "command line", ["img2img", model, root / "nope.png", "--out", out],
         "error", "nope.png")
    t = ["train", "digits-tiny", "--out", out]
    for args, needle in [(["--steps", 0], "--steps"), (["--steps", -5], "--steps"),
                         (["--device", "toaster"], "toaster"), (["--steps", "lots"], "--steps")]:
        case(f"train {' '.join(map(str, args))}", "command line", [*t, *args], "error", needle)
    case("train --resume of an empty folder", "command line", [*t, "--resume"], "error", "no checkpoint")
    v = ["viz", "forward", good, "--out", out / "f.png"]
    for args, needle in [(["--t", "5000"], "5000"), (["--t", "abc"], "abc"), (["--t", "-1"], "-1"),
                         (["--num-timesteps", 1], "--num-timesteps"), (["--schedule", "quadratic"], "quadratic"),
                         (["--image-size", 0], "--image-size")]:
        case(f"viz forward {' '.join(map(str, args))}", "command line", [*v, *args], "error", needle)
    case("viz schedules --names bogus", "command line", ["viz", "schedules", "--names", "bogus", "--out",
                                                         out / "s.png"], "error", "bogus")
    case("eval --n-samples 5", "command line", ["eval", model, "--n-samples", 5], "error", "--n-samples")
    case("eval --features domain:/nowhere", "command line", ["eval", model, "--n-samples", 10, "--features",
                                                             "domain:/nowhere"], "error", "/nowhere")
    case("demo --minutes 0", "command line", ["demo", "--minutes", 0, "--out", out], "error", "--minutes")
    case("unknown command", "command line", ["trian", "digits-tiny"], "error", "trian")

    # Output paths, JSON types, encodings, absurd sizes, special files, the held-out split (more_cases).
    OMITTED[:] = more_cases(case, root, model, run, text_model, good, images["truncated.png"][0],
                            lambda seed: _png_bytes(_noise(16, seed)), out, TINY)

    # A few through a real process: the same rules with Python's own start-up and exit.
    for name in in_subprocess:
        c = next(c for c in cases if c.name == name)
        own, mine = str(root / "out" / f"{cases.index(c):03d}"), str(root / "out" / f"{len(cases):03d}")
        cases.append(Case(c.name + " [subprocess]", c.group, [a.replace(own, mine) for a in c.argv], c.expect,
                          c.needle, True))
    return cases


OMITTED: list[str] = []  # kinds of case this machine could not set up (more_cases says which)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# ------------------------------------------------------------------ the corpus, continued
# The corpus, continued (make_corpus calls more_cases): output paths, wrong JSON types in every
# file the project reads back, text on the command line that is not valid in the locale's encoding, absurd
# sizes, special files (FIFOs, sockets, devices) where files are read, and bad files in the held-out split.
#
# Some cases need the machine's help: an immutable folder needs ``chattr +i`` (root ignores permission bits,
# so a read-only mode alone does not stop its writes), a full disk needs a tiny tmpfs (``mount``). Where
# those cannot be made, their cases are left out and :func:`more_cases` says which.

OUT_PATHS = "output paths"
JSON_TYPES = "JSON types"
ENCODINGS = "encodings"
SIZES = "absurd sizes"
SPECIAL = "special files"
HELD_OUT = "held-out split"
LONG_PROMPT = "sample a 100 000-character prompt"  # runs as a real process: transformers logs to the real stderr


def more_cases(case: Callable[..., None], root: Path, model: Path, run: Path, text_model: Path | None,
               good: Path, truncated_png: bytes, noise_png: Callable[[int], bytes], out: Any,
               tiny: list[str]) -> list[str]:
    """Add the cases of these groups through ``case`` (make_corpus's); returns the kinds of case this
    machine could not set up (and so are not run)."""
    omitted: list[str] = []
    blocked = root / "blocked"  # a regular file: outputs placed below it cannot be created
    blocked.write_bytes(b"a regular file\n")
    immutable = _immutable_folder(root / "immutable")
    full = _full_disk(root / "full_disk")
    if immutable is None:
        omitted.append("outputs in an immutable folder (chattr +i unavailable)")
    if full is None:
        omitted.append("outputs on a full disk (no tmpfs could be mounted)")

    # ---- output paths: refused before any work, naming the path
    s1 = ["--steps", 1, "--n-samples", 1]
    folders = {"train --out": ["train", "digits-tiny", *tiny, "--steps", 1, "--out"],
               "sample --out": ["sample", model, *s1, "--out"], "convert OUT": ["convert", model],
               "demo --out": ["demo", "--out"], "serve --out": ["serve", "--model", model, "--out"]}
    for name, argv in folders.items():
        case(f"{name} below a regular file", OUT_PATHS, [*argv, blocked / "sub"], "error",
             f"{blocked} is a regular file")
        case(f"{name} is a regular file", OUT_PATHS, [*argv, blocked], "error", "is a regular file, not a folder")
        if immutable is not None:
            case(f"{name} in an immutable folder", OUT_PATHS, [*argv, immutable / "out"], "error",
                 f"cannot write in {immutable}")
        if full is not None and name in ("train --out", "sample --out", "convert OUT"):
            case(f"{name} on a full disk", OUT_PATHS, [*argv, full / "out"], "error", "of disk space")
    files = {"eval --out": ["eval", model, "--n-samples", 10, "--out"],
             "viz forward --out": ["viz", "forward", good, "--out"],
             "viz schedules --out": ["viz", "schedules", "--out"],
             "viz reverse --gif": ["viz", "reverse", model, "--steps", 2, "--out", out / "r.png", "--gif"]}
    for name, argv in files.items():
        case(f"{name} below a regular file", OUT_PATHS, [*argv, blocked / "x.png"], "error",
             f"{blocked} is a regular file")
        case(f"{name} is a folder", OUT_PATHS, [*argv, root], "error", "is a folder, not a regular file")
        if immutable is not None:
            case(f"{name} in an immutable folder", OUT_PATHS, [*argv, immutable / "x.png"], "error",
                 f"cannot write in {immutable}")

    # ---- wrong JSON types in every file read back: one line naming the file and the key
    sample = ["sample", "--steps", 1, "--n-samples", 1, "--out", out]

    def damaged(folder: Path, rel: str, value: Any, name: str) -> Path:
        copy = root / "json" / name
        shutil.copytree(folder, copy)
        (copy / rel).write_text(json.dumps(value))
        return copy

    manifest = json.loads((model / "model_index.json").read_text())
    without = {k: v for k, v in manifest.items() if k != "image_size"}
    for label, value, needle in [
        ("null", None, "model_index.json: expected a JSON object of settings, got null"),
        ("a list", [1, 2], "model_index.json: expected a JSON object"),
        ("a string", "model", "model_index.json: expected a JSON object"),
        ("a number", 5, "model_index.json: expected a JSON object"),
        ("image_size null", manifest | {"image_size": None}, "model_index.json: image_size"),
        ("image_size the string \"16\"", manifest | {"image_size": "16"}, "model_index.json: image_size: expected int"),
        ("image_size missing", without, "model_index.json: missing key(s) image_size"),
        ("channels a float", manifest | {"channels": 1.5}, "model_index.json: channels"),
        ("components a string", manifest | {"components": "unet"}, "model_index.json: components"),
        ("diffusion a list", manifest | {"diffusion": [1000]}, "model_index.json: diffusion"),
        ("diffusion.num_timesteps a string",
         manifest | {"diffusion": manifest["diffusion"] | {"num_timesteps": "1000"}},
         "diffusion.num_timesteps"),
        ("latent_shape holding a string", manifest | {"latent_shape": [1, "16", 16]}, "latent_shape[1]"),
        ("kind a number", manifest | {"kind": 3}, "model_index.json: kind"),
        ("step a float", manifest | {"step": 2.5}, "model_index.json: step"),
    ]:
        folder = damaged(model, "model_index.json", value, f"manifest {label}")
        case(f"sample: model_index.json {label}", JSON_TYPES, [sample[0], folder, *sample[1:]], "error", needle)
    unet = json.loads((model / "unet" / "config.json").read_text())
    for label, value, needle in [
        ("null", None, "unet/config.json: expected a JSON object"),
        ("a list", [unet], "unet/config.json: expected a JSON object"),
        ("a string", "unet", "unet/config.json: expected a JSON object"),
        ("model_channels null", unet | {"model_channels": None}, "model_channels"),
        ("channel_mult a string", unet | {"channel_mult": "12"}, "channel_mult"),
        ("num_heads a float", unet | {"num_heads": 2.5}, "num_heads"),
        ("attention_resolutions an object", unet | {"attention_resolutions": {"2": True}}, "attention_resolutions"),
        ("dropout a string", unet | {"dropout": "0.1"}, "dropout"),
    ]:
        folder = damaged(model, "unet/config.json", value, f"unet {label}")
        case(f"sample: unet/config.json {label}", JSON_TYPES, [sample[0], folder, *sample[1:]], "error",
             needle if "config.json" in needle else f"unet/config.json: unet.{needle}")
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    pointed = run / "checkpoints" / latest["checkpoint"] / "state.json"
    state = json.loads(pointed.read_text())
    resume = ["train", "digits-tiny", *tiny, "--steps", 4, "--resume", "--out"]
    for label, rel, value, needle in [
        ("latest.json a list", "checkpoints/latest.json", [latest], "latest.json: expected a JSON object"),
        ("latest.json empty", "checkpoints/latest.json", {}, "latest.json: missing key(s) checkpoint, step"),
        ("latest.json checkpoint a number", "checkpoints/latest.json", latest | {"checkpoint": 2},
         "latest.json: checkpoint"),
        ("latest.json step a string", "checkpoints/latest.json", latest | {"step": "2"}, "latest.json: step"),
        ("latest.json pointing outside", "checkpoints/latest.json", latest | {"checkpoint": "../../etc"},
         "latest.json: checkpoint"),
        ("state.json null", pointed.relative_to(run), None, "state.json: expected a JSON object"),
        ("state.json step a string", pointed.relative_to(run), state | {"step": "2"}, "state.json: step"),
        ("state.json images_seen null", pointed.relative_to(run), state | {"images_seen": None}, "images_seen"),
        ("state.json extra a number", pointed.relative_to(run), state | {"extra": 5}, "state.json: extra"),
        ("state.json optimizers a list", pointed.relative_to(run), state | {"optimizers": []},
         "state.json: optimizers"),
        ("state.json optimizer groups a number", pointed.relative_to(run),
         state | {"optimizers": {"model": {"param_groups": 5}}}, "optimizers.model"),
        ("state.json optimizer missing", pointed.relative_to(run), state | {"optimizers": {}}, "optimizers.model"),
    ]:
        folder = damaged(run, str(rel), value, f"run {label}")
        case(f"train --resume: {label}", JSON_TYPES, [*resume, folder], "error", needle)
    if text_model is not None:
        encoder = json.loads((text_model / "text_encoder" / "config.json").read_text())
        for label, value, needle in [
            ("a list", [encoder], "text_encoder/config.json: expected a JSON object"),
            ("context_length a string", encoder | {"context_length": "eight"},
             "text_encoder/config.json: context_length"),
            ("context_length 0", encoder | {"context_length": 0}, "text_encoder/config.json: context_length"),
            ("kind a number", encoder | {"kind": 5}, "text_encoder/config.json: unknown text encoder kind 5"),
        ]:
            folder = damaged(text_model, "text_encoder/config.json", value, f"text encoder {label}")
            case(f"sample: text_encoder/config.json {label}", JSON_TYPES, [sample[0], folder, *sample[1:]],
                 "error", needle)
    import latentdiff.eval

    shipped = Path(latentdiff.eval.__file__).parent / "weights" / "mnist5k"
    classifier = json.loads((shipped / "config.json").read_text())
    for label, rel, value, needle in [
        ("config.json a list", "config.json", [classifier], "config.json: expected a JSON object"),
        ("config.json feature_dim a string", "config.json", classifier | {"feature_dim": "64"}, "feature_dim"),
        ("metrics.json a list", "metrics.json", [0.99], "metrics.json: expected a JSON object"),
    ]:
        folder = damaged(shipped, rel, value, f"classifier {label}")
        case(f"eval --features domain: {label}", JSON_TYPES,
             ["eval", model, "--n-samples", 10, "--steps", 1, "--features", f"domain:{folder}"], "error", needle)

    # ---- command-line text that is not valid in the locale's encoding (Python keeps such bytes as surrogates)
    raw = "\udcff\udcfea cat"  # the bytes ff fe: not UTF-8
    s = ["sample", model, *s1, "--out", out]
    case("sample --prompt with invalid UTF-8 bytes", ENCODINGS, [*s, "--prompt", raw], "error", "--prompt")
    case("sample --prompt with invalid UTF-8 bytes [subprocess]", ENCODINGS, [*s, "--prompt", raw], "error",
         "byte 0xff", sub=True)
    case("sample --negative-prompt with invalid UTF-8 bytes", ENCODINGS, [*s, "--negative-prompt", raw], "error",
         "--negative-prompt")
    case("sample --sampler with invalid UTF-8 bytes", ENCODINGS, [*s, "--sampler", "ddim\udcff"], "error", "--sampler")
    case("train override with invalid UTF-8 bytes", ENCODINGS,
         ["train", "digits-tiny", f"data.source={root}/\udce9t\udce9", "--out", out], "error", "byte 0xe9")
    case("sample --seed 9223372036854775807 --n-samples 1", "command line", [*s, "--seed", 2**63 - 1], "ok")
    if text_model is not None:  # one warning line, not also the tokenizer library's own
        case(LONG_PROMPT, ENCODINGS, ["sample", text_model, *s1, "--out", out, "--prompt", "a " * 50_000], "ok",
             "truncated to the context length", sub=True, lines=1)

    # ---- sizes that cannot fit in memory: refused before allocating, with the limit and why
    case("sample --size 100000", SIZES, [*s, "--size", 100000], "error", "--size: drawing 1 image(s) of 100000x100000")
    case("sample --n-samples 1000000000", SIZES, ["sample", model, "--steps", 1, "--n-samples", 10**9, "--out", out],
         "error", "--n-samples: drawing 1000000000 image(s)")
    case("img2img --size 100000", SIZES, ["img2img", model, good, *s1, "--size", 100000, "--out", out], "error",
         "GiB of memory")
    case("viz forward --image-size 100000", SIZES, ["viz", "forward", good, "--image-size", 100000, "--out",
                                                    out / "f.png"], "error", "--image-size 100000")

    # ---- special files where files are read: refused or skipped by type, never opened (a FIFO blocks forever)
    def folder_with(name: str, make: Callable[[Path], None], captions: bool = False) -> Path:
        folder = root / "special" / name
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{i}.png").write_bytes(noise_png(40 + i))
            if captions:
                (folder / f"{i}.txt").write_text(f"a picture number {i}\n")
        make(folder)
        return folder

    fifo = folder_with("fifo", lambda f: os.mkfifo(f / "x.png"))
    train_folder = ["train", "digits-tiny", *tiny, "data.image_size=16", "--steps", 1, "--out", out]
    case("train folder with a FIFO x.png, on_bad_file=fail", SPECIAL,
         [*train_folder, f"data.source={fifo}", "data.on_bad_file=fail"], "error", "x.png: cannot read image (a FIFO")
    case("train folder with a FIFO x.png, on_bad_file=fail [subprocess]", SPECIAL,
         [*train_folder, f"data.source={fifo}", "data.on_bad_file=fail"], "error", "a FIFO (named pipe)", sub=True)
    case("train folder with a FIFO x.png, on_bad_file=skip", SPECIAL, [*train_folder, f"data.source={fifo}"], "skip",
         "first: x.png (a FIFO (named pipe), not a regular file)")
    sock = folder_with("socket", _bind_socket)
    case("train folder with a socket s.png", SPECIAL, [*train_folder, f"data.source={sock}", "data.on_bad_file=fail"],
         "error", "s.png: cannot read image (a socket")
    if os.path.exists("/dev/zero"):
        dev = folder_with("device", lambda f: (f / "zero.png").symlink_to("/dev/zero"))
        case("train folder with zero.png -> /dev/zero", SPECIAL,
             [*train_folder, f"data.source={dev}", "data.on_bad_file=fail"], "error", "zero.png: cannot read image (a "
                                                                                    "character device")
    else:
        omitted.append("a device in a training folder (no /dev/zero)")
    meta_fifo = folder_with("metadata_fifo", lambda f: os.mkfifo(f / "metadata.jsonl"))
    case("metadata.jsonl is a FIFO", SPECIAL, [*train_folder, f"data.source={meta_fifo}", "data.channels=3"], "error",
         "metadata.jsonl: is a FIFO")
    def caption_fifo(folder: Path) -> None:
        (folder / "3.txt").unlink()
        os.mkfifo(folder / "3.txt")

    txt_fifo = folder_with("caption_fifo", caption_fifo, captions=True)
    case("a caption .txt is a FIFO", SPECIAL, [*train_folder, f"data.source={txt_fifo}", "data.channels=3"], "error",
         "3.txt: is a FIFO")
    image_fifo = root / "special" / "image.png"
    os.mkfifo(image_fifo)
    case("img2img input is a FIFO", SPECIAL, ["img2img", model, image_fifo, *s1, "--out", out], "error",
         "image.png: is a FIFO")
    case("inpaint mask is a FIFO", SPECIAL, ["inpaint", model, good, image_fifo, *s1, "--out", out], "error",
         "image.png: is a FIFO")
    case("sample --out is a FIFO", SPECIAL, [*s[:-1], image_fifo], "error", "is a FIFO (named pipe), not a folder")
    for label, rel in [("model_index.json", "model_index.json"), ("unet/model.safetensors", "unet/model.safetensors")]:
        folder = root / "special" / f"model {label.replace('/', ' ')}"
        shutil.copytree(model, folder)
        (folder / rel).unlink()
        os.mkfifo(folder / rel)
        case(f"sample: {label} is a FIFO", SPECIAL, ["sample", folder, *s1, "--out", out], "error", f"{rel}: is a FIFO")
    folder = root / "special" / "run latest.json"
    shutil.copytree(run, folder)
    (folder / "checkpoints" / "latest.json").unlink()
    os.mkfifo(folder / "checkpoints" / "latest.json")
    case("train --resume: latest.json is a FIFO", SPECIAL, [*resume, folder], "error", "latest.json: is a FIFO")

    # ---- bad files in the held-out split: checked (cheaply) at the start of training too
    name = next(f"held_out_{i}.png" for i in range(1000) if _in_test(f"held_out_{i}.png"))
    held = root / "held_out"
    held.mkdir()
    for i in range(6):
        if not _in_test(f"{i}.png"):
            (held / f"{i}.png").write_bytes(noise_png(60 + i))
    (held / name).write_bytes(truncated_png)
    case("train folder, a truncated PNG in the held-out split, on_bad_file=fail", HELD_OUT,
         [*train_folder, f"data.source={held}", "data.on_bad_file=fail"], "error", f"{name}: cannot read image")
    case("train folder, a truncated PNG in the held-out split, on_bad_file=skip", HELD_OUT,
         [*train_folder, f"data.source={held}"], "skip", f"in the 'test' split (not used by this run; eval would skip "
                                                         f"them); first: {name}")
    return omitted


def _in_test(name: str) -> bool:
    from latentdiff.data.source import in_test

    return in_test(name)


def _bind_socket(folder: Path) -> None:
    """A Unix socket named s.png (left bound: its file stays a socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "s.png"))
    sock.close()  # closing keeps the socket file; nothing listens


def _immutable_folder(path: Path) -> Path | None:
    """A folder no process may write into, root included (chattr +i); None where that cannot be made."""
    path.mkdir()
    if shutil.which("chattr") is None:
        return None
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        return None
    try:  # proof: even root cannot create a file there
        (path / "probe").touch()
    except OSError:
        return path
    (path / "probe").unlink()
    subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
    return None


def _full_disk(path: Path) -> Path | None:
    """A 64 KiB tmpfs filled to the last byte; None where it cannot be mounted (not root, no CAP_SYS_ADMIN)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        return None
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return path


def release(root: Path) -> None:
    """Undo what the corpus set up outside plain files (the immutable flag, the mount), so that it can be removed."""
    if (root / "immutable").is_dir() and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(root / "immutable")], capture_output=True, check=False)
    if os.path.ismount(root / "full_disk"):
        subprocess.run(["umount", str(root / "full_disk")], capture_output=True, check=False)


# ------------------------------------------------------------------------------------ running


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def run_case(case: Case, root: Path, timeout: float = TIME_BOUND) -> Outcome:
    """Run one case (in this process or a child) and check it against the rules."""
    before = _files(root)
    t0 = time.perf_counter()
    if case.subprocess:
        try:
            r = subprocess.run([sys.executable, "-m", "latentdiff", *case.argv], capture_output=True, text=True,
                               timeout=timeout, cwd=root)
            code, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            code, err = None, "hung"
    else:
        code, err = _in_process(case.argv, timeout, root)
    seconds = time.perf_counter() - t0
    problems = []
    lines = [line for line in err.splitlines() if line.strip()]
    if code is None:
        problems.append(f"no result within {timeout:.0f} s" if err == "hung" else err)
    elif LAST_RESORT in err:  # the CLI's safety net caught what no check did: a bug, even if it reads as one line
        problems.append(f"reached the last-resort handler: {lines[-1] if lines else ''}")
    elif "Traceback" in err:
        problems.append("printed a traceback")
    elif case.expect == "error":
        if code != 2:
            problems.append(f"exit code {code}, expected 2")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not one 'error: ...' line: {lines[:4]}")
        if case.needle and case.needle not in err:
            problems.append(f"the error does not name {case.needle!r}")
        created = sorted(str(p.relative_to(root)) for p in _files(root) - before)
        if created:
            problems.append(f"an error case created files: {created[:4]}")
    else:
        if code != 0:
            problems.append(f"exit code {code}, expected 0")
        if case.needle and case.needle not in err:
            problems.append(f"no warning naming {case.needle!r}")
        if case.lines is not None and len(lines) != case.lines:
            problems.append(f"{len(lines)} lines on stderr, expected {case.lines}: {lines[:4]}")
    temps = [p for p in _files(root) if p.name.startswith(".") and p.name.endswith(".tmp")]
    if temps:
        problems.append(f"temporary files left: {temps[:3]}")
    if (root / "marker").exists():
        problems.append("UNPICKLED CODE RAN: the marker file exists")
    return Outcome(case.name, case.group, case.expect, code, seconds, err, problems)


def _in_process(argv: list[str], timeout: float, root: Path) -> tuple[int | None, str]:
    """(exit code, stderr) of ``latentdiff ARGV`` run through latentdiff.cli.main in this process."""
    from latentdiff.cli import main

    hung = []

    def hang(signum, frame):
        if not hung:  # the first tick: stop the case
            hung.append(True)
            raise _Hang
        # later ticks, while the case unwinds: a worker thread blocked opening a FIFO of the corpus (the bug
        # this guards against) would keep its pool from shutting down; a writer's open lets its read end
        _open_fifos_for_writing(root)

    err, old_argv = io.StringIO(), sys.argv
    # Log records reach stderr as in the command (Python's last-resort handler prints the bare message at
    # WARNING), also where a test framework has installed handlers of its own.
    log = logging.StreamHandler(err)
    log.setLevel(logging.WARNING)
    logging.getLogger().addHandler(log)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, timeout, 1.0)
    sys.argv = ["latentdiff", *argv]
    code: int | None = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _Hang:
        return None, "hung"
    except BaseException as e:  # what the CLI let escape is a traceback for the user
        import traceback

        return 1, err.getvalue() + "".join(traceback.format_exception(e))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        logging.getLogger().removeHandler(log)
        sys.argv = old_argv
    return code, err.getvalue()


def _open_fifos_for_writing(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                try:  # succeeds only where a reader waits; closing it at once gives that reader end-of-file
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass


def train_tiny_model(folder: Path) -> tuple[Path, Path]:
    """A seconds-long digits-tiny run: (its model folder, its run folder) — the same folder."""
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    cfg = load_config("digits-tiny", [*TINY, "train.steps=2"])
    make_trainer(cfg, folder, progress=False).run()
    return folder, folder


def train_tiny_text_model(folder: Path) -> Path:
    """A seconds-long text-conditional run (shapes captions, the packaged MiniLM encoder, 16 px pixels)."""
    from latentdiff.training import make_trainer
    from latentdiff.training.config import load_config

    cfg = load_config("digits-tiny", [*TINY, "train.steps=1", "data.source=shapes", "data.channels=3",
                                      "unet.in_channels=3", "unet.out_channels=3", "unet.context_dim=384",
                                      "cond.context_length=8"])
    with warnings.catch_warnings():  # the shapes captions are longer than 8 tokens: cut, as meant
        warnings.filterwarnings("ignore", message="prompt .* truncated to the context length")
        make_trainer(cfg, folder, progress=False).run()
    return folder


# ---------------------------------------------------------------------------------- the report


def main() -> None:
    """Generate the corpus in a temporary folder, run every case, write the report."""
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_name  # benchmarks/machine.py, beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bad_inputs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, run = train_tiny_model(Path(tmp) / "model")
        text_model = train_tiny_text_model(Path(tmp) / "text_model")
        corpus = Path(tmp) / "corpus"
        try:
            cases = make_corpus(corpus, model, run, text_model=text_model)
            outcomes = [run_case(c, corpus) for c in cases]
        finally:
            release(corpus)
        for o, c in zip(outcomes, cases):  # the line that matters, with the temporary folder's name left out
            lines = o.stderr.strip().splitlines() or [""]
            o.stderr = next((ln for ln in lines if c.needle and c.needle in ln), lines[-1]).replace(tmp, "…")
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "command": "python benchmarks/bad_inputs.py",
              "wall_seconds": round(time.perf_counter() - t0, 1), "cases": len(outcomes),
              "passed": sum(o.passed for o in outcomes),
              "by_expectation": {e: sum(o.expect == e for o in outcomes) for e in ("error", "skip", "ok")},
              "by_group": {g: sum(o.group == g for o in outcomes) for g in dict.fromkeys(o.group for o in outcomes)},
              "subprocess_cases": sum(c.subprocess for c in cases), "omitted": list(OMITTED),
              "slowest_seconds": round(max(o.seconds for o in outcomes), 2),
              "outcomes": [{"name": o.name, "group": o.group, "expect": o.expect, "exit": o.code,
                            "seconds": round(o.seconds, 2), "message": o.stderr,
                            "problems": o.problems} for o in outcomes]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    sys.exit(0 if result["passed"] == result["cases"] else 1)


def _markdown(r: dict) -> str:
    rows = "\n".join(f"| {o['group']} | {o['name']} | {o['expect']} | {o['exit']} | "
                     f"{'ok' if not o['problems'] else '; '.join(o['problems'])} | "
                     f"{o['message'][:140].replace('|', '/')} |" for o in r["outcomes"])
    return (f"# Bad-input suite\n\nMachine: {r['machine']}. Command: `{r['command']}` ({r['wall_seconds']:.0f} s, "
            f"slowest case {r['slowest_seconds']} s).\n\n**{r['passed']} of {r['cases']} cases pass** "
            f"({r['by_expectation']['error']} must end in a one-line error with exit code 2, "
            f"{r['by_expectation']['skip']} in a counted skip, {r['by_expectation']['ok']} are unusual but valid "
            f"inputs that must be read; {r['subprocess_cases']} of them also as a real process). Every case also "
            f"checks: no traceback, never the CLI's last-resort handler, a result within {TIME_BOUND:.0f} s, no "
            f"temporary file left, no file created by a failing command, and no code run from a pickle.\n\nCases per "
            f"group: {', '.join(f'{g} {n}' for g, n in r['by_group'].items())}.\n\n"
            f"{'Not run on this machine: ' + '; '.join(r['omitted']) + '.' if r['omitted'] else 'No case was left out.'}"  # noqa: E501
            f"\n\n"
            f"| group | case | expected | exit | result | message (the line naming the needle, else the last) |\n"
            f"|---|---|---|---:|---|---|\n{rows}\n")


if __name__ == "__main__":
    main()
