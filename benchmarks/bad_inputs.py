"""Bad-input suite: generate a corpus of broken inputs and run every one through the real CLI.

    nice -n 10 python benchmarks/bad_inputs.py

The corpus is made by code, never picked by hand: truncated, corrupt and zero-byte PNG/JPEG files,
decompression-bomb headers, 16-bit and CMYK images, captions in latin-1 and UTF-16, folders of non-images,
truncated and bit-flipped safetensors in model folders and checkpoints, a pickle that would create a
marker file if anything unpickled it, configs with wrong types and unknown keys, and absurd command-line
values. Each case states its expected outcome:

- ``error``: exit code 2 and exactly one line on stderr, ``error: ...``, naming the needle (file, key
  or value); no traceback;
- ``skip``: exit code 0 and a warning that counts the skipped files (data.on_bad_file=skip, documented
  in the README, "Image folders");
- ``ok``: a valid but unusual input (16-bit, CMYK) that is read correctly, exit code 0.

Every case also runs within a time bound, leaves no temporary file, and an ``error`` case creates no
file at all. Most cases run in this process through the CLI's entry point (``latentdiff.cli.main``,
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
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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


def make_corpus(root: Path, model: Path, run: Path, in_subprocess: tuple[str, ...] = SUBPROCESS_CASES) -> list[Case]:
    """Write the corpus under ``root`` and return its cases. ``model`` is a trained model folder and ``run``
    the run folder that made it (`latentdiff train digits-tiny`), both left untouched; ``root/marker`` must
    never appear. The cases named in ``in_subprocess`` also run once more as a real process."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    out = OUT  # each case writes to its own root/out/NNN (so that a run folder never carries over)

    def case(name, group, argv, expect="error", needle="", sub=False):
        own = root / "out" / f"{len(cases):03d}"
        argv = [str(own) if a is OUT else str(a).replace(str(OUT), str(own)) for a in argv]
        cases.append(Case(name, group, argv, expect, needle, sub))

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
    for args, needle in [(["--steps", 0], "--steps"), (["--steps", -5], "--steps"), (["--device", "toaster"], "toaster"),
                         (["--steps", "lots"], "--steps")]:
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

    # A few through a real process: the same rules with Python's own start-up and exit.
    for name in in_subprocess:
        c = next(c for c in cases if c.name == name)
        own, mine = str(root / "out" / f"{cases.index(c):03d}"), str(root / "out" / f"{len(cases):03d}")
        cases.append(Case(c.name + " [subprocess]", c.group, [a.replace(own, mine) for a in c.argv], c.expect,
                          c.needle, True))
    return cases


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


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
        code, err = _in_process(case.argv, timeout)
    seconds = time.perf_counter() - t0
    problems = []
    lines = [line for line in err.splitlines() if line.strip()]
    if code is None:
        problems.append(f"no result within {timeout:.0f} s" if err == "hung" else err)
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
    temps = [p for p in _files(root) if p.name.startswith(".") and p.name.endswith(".tmp")]
    if temps:
        problems.append(f"temporary files left: {temps[:3]}")
    if (root / "marker").exists():
        problems.append("UNPICKLED CODE RAN: the marker file exists")
    return Outcome(case.name, case.group, case.expect, code, seconds, err, problems)


def _in_process(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, stderr) of ``latentdiff ARGV`` run through latentdiff.cli.main in this process."""
    from latentdiff.cli import main

    def hang(signum, frame):
        raise _Hang

    err, old_argv = io.StringIO(), sys.argv
    # Log records reach stderr as in the command (Python's last-resort handler prints the bare message at
    # WARNING), also where a test framework has installed handlers of its own.
    log = logging.StreamHandler(err)
    log.setLevel(logging.WARNING)
    logging.getLogger().addHandler(log)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, timeout)
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


def train_tiny_model(folder: Path) -> tuple[Path, Path]:
    """A seconds-long digits-tiny run: (its model folder, its run folder) — the same folder."""
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    cfg = load_config("digits-tiny", [*TINY, "train.steps=2"])
    make_trainer(cfg, folder, progress=False).run()
    return folder, folder


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
        corpus = Path(tmp) / "corpus"
        cases = make_corpus(corpus, model, run)
        outcomes = [run_case(c, corpus) for c in cases]
        for o, c in zip(outcomes, cases):  # the line that matters, with the temporary folder's name left out
            lines = o.stderr.strip().splitlines() or [""]
            o.stderr = next((ln for ln in lines if c.needle and c.needle in ln), lines[-1]).replace(tmp, "…")
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "command": "python benchmarks/bad_inputs.py",
              "wall_seconds": round(time.perf_counter() - t0, 1), "cases": len(outcomes),
              "passed": sum(o.passed for o in outcomes),
              "by_expectation": {e: sum(o.expect == e for o in outcomes) for e in ("error", "skip", "ok")},
              "by_group": {g: sum(o.group == g for o in outcomes) for g in dict.fromkeys(o.group for o in outcomes)},
              "subprocess_cases": sum(c.subprocess for c in cases),
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
            f"checks: no traceback, a result within {TIME_BOUND:.0f} s, no temporary file left, no file created by a "
            f"failing command, and no code run from a pickle.\n\nCases per group: "
            f"{', '.join(f'{g} {n}' for g, n in r['by_group'].items())}.\n\n"
            f"| group | case | expected | exit | result | message (the line naming the needle, else the last) |\n|---|---|---|---:|---|---|\n{rows}\n")


if __name__ == "__main__":
    main()
