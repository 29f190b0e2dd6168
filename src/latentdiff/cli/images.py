"""The image-making commands (sample, img2img, inpaint, upscale): one options block, one runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from latentdiff.cli.app import cli
from latentdiff.cli.options import Finite, image_options, load_model, naming_options, setting, settings_from
from latentdiff.errors import SettingError, UserError

LOAD_PARAMS = ("prediction", "precision", "attention_slice", "vae_tile", "config", "tokenizer", "loras")


def generate_images(path: Path, task: str, params: dict[str, Any], image: Optional[Path] = None,
                    mask: Optional[Path] = None, low_res: Optional[Path] = None) -> None:
    """Load the model, check the settings for ``task``, read the inputs, draw, write PNGs, report."""
    from latentdiff.data.decode import read_image
    from latentdiff.data.masks import read_mask
    from latentdiff.models.settings import Task
    from latentdiff.pipelines.stream import stream_images

    task = Task(task)
    pipe = load_model(path, params["device"], **{k: params[k] for k in LOAD_PARAMS})
    try:
        strength = {} if params.get("strength") is not None else {"strength": task.default_strength}
        settings = pipe.check(settings_from(params, **strength), task)
    except SettingError as e:
        raise naming_options(e) from None
    check_room(pipe, settings, params)
    inputs, hw, channels = {}, pipe.image_hw(settings), pipe.manifest.channels
    if image is not None:
        inputs["images"] = read_image(image, hw, channels)[None]
    if mask is not None:
        inputs["mask"] = read_mask(mask, hw)
    if low_res is not None:
        inputs["low_res"] = _read_low_res(low_res, pipe.manifest.low_res_size, channels)
    files = {k: str(v) for k, v in (("input", image or low_res), ("mask", mask)) if v is not None}
    meta = pipe.describe(settings, task) | files
    done = stream_images(pipe, settings, params["out"], meta, params["fmt"], params["overwrite"], inputs)
    kept = f", {done.reused} kept from an earlier run" if done.reused else ""
    click.echo(f"{done.drawn} images drawn in {params['out']}{kept} ({done.seconds_per_image:.3f} s/image, "
               f"{meta['sampler']} {meta['spacing']}, {done.nfe:g} network evaluations per image); grid: {done.grid}")


def check_room(pipe: Any, s: Any, params: dict[str, Any]) -> None:
    """Refuse, before drawing, images that cannot fit in memory or on the disk of --out (from sizes alone)."""
    from latentdiff.data.source import memory_needed
    from latentdiff.formats.paths import check_free_space

    (c_lat, h, w), (height, width) = pipe.latent_shape(s), pipe.image_hw(s)
    channels, n, b = pipe.manifest.channels, s.n_samples, min(s.batch_size, s.n_samples)
    width_bytes = next(pipe.unet.parameters()).element_size()
    # lower bounds: per network call the UNet's first feature map and a decoded float batch; until written,
    # every latent (fp32) and every image (uint8)
    per_call = b * (pipe.unet.config.model_channels * h * w * width_bytes + channels * height * width * 4)
    kept = n * (c_lat * h * w * 4 + channels * height * width)
    problem = memory_needed(per_call + kept, pipe.device)
    if problem:
        option = "--n-samples" if kept > per_call else "--size" if params.get("size") else "--batch-size"
        raise UserError(f"{option}: drawing {n} image(s) of {width}x{height}, {b} per network call, needs {problem} "
                        "(the UNet's first feature maps and the images alone); lower --size, --batch-size or "
                        "--n-samples")
    check_free_space(params["out"], n * channels * height * width, "--out",
                     f"{n} PNG image(s) of {width}x{height} (their uncompressed size)")


def _default_strength(task: str) -> float:
    from latentdiff.models.settings import Task

    return Task(task).default_strength


def _read_low_res(path: Path, size: int, channels: int) -> Any:
    """A low-resolution input as uint8 (1, C, size, size); any other size is refused, not resized."""
    from PIL import Image, UnidentifiedImageError

    from latentdiff.data.decode import read_image
    from latentdiff.formats.paths import check_regular_file

    check_regular_file(path, "image file")  # a FIFO would block the read forever
    try:
        with Image.open(path) as im:
            got = im.size
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    if got != (size, size):
        raise UserError(f"{path} is {got[0]}x{got[1]}; this model upscales {size}x{size} images "
                        f"(resize the input to {size}x{size} first)")
    return read_image(path, size, channels)[None]


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model", default=None, type=click.Path(path_type=Path),
              help="Instead of RUN_DIR: a model folder, a diffusers SD folder or an SD .safetensors/.ckpt file.")
@image_options
def sample(run_dir: Optional[Path], model: Optional[Path], **params: Any) -> None:
    """Draw images from a trained model folder or a Stable Diffusion checkpoint; PNGs keep their settings."""
    if (run_dir is None) == (model is None):
        raise UserError("give the model as RUN_DIR or as --model PATH (exactly one)")
    generate_images(run_dir or model, "txt2img", params)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@setting("--strength", type=Finite(0, 1), shown=lambda: _default_strength("img2img"),
         help="How far to noise the input: 0 returns it, 1 ignores it (SDEdit).")
@image_options
def img2img(model_dir: Path, image: Path, **params: Any) -> None:
    """Redraw IMAGE: noise it to --strength and denoise with the model (SDEdit)."""
    generate_images(model_dir, "img2img", params, image=image)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@setting("--resample", type=click.IntRange(min=1),
         help="RePaint: repeat each step this often, re-noising in between (better seams, more NFE).")
@image_options
def inpaint(model_dir: Path, image: Path, mask: Path, **params: Any) -> None:
    """Redraw the white part of MASK (a PNG) in IMAGE; the rest is kept exactly."""
    generate_images(model_dir, "inpaint", params, image=image, mask=mask)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--input", "low_res", required=True, type=click.Path(path_type=Path),
              help="The low-resolution image, at the model's low_res_size (model_index.json).")
@image_options
def upscale(model_dir: Path, low_res: Path, **params: Any) -> None:
    """Super-resolution with an SR3 model (cond.concat=low_res): --n-samples different high-resolution images."""
    generate_images(model_dir, "upscale", params, low_res=low_res)
