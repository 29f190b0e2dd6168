"""The ``latentdiff`` command: parse, validate, call training or a pipeline, report.

Bad input ends in one line ``error: …`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from latentdiff.errors import UserError

SEED_MAX = 2**63 - 1


class Finite(click.FloatRange):
    """A float (optionally within bounds) that is not NaN or infinite; click's FloatRange lets NaN through."""

    name = "finite float"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        """The float, or a usage error naming the option."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class ImageSize(click.ParamType):
    """An image size: one side (a square) or WIDTHxHEIGHT, as the web UIs write it; gives a side or (h, w)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | tuple[int, int]:
        """A side, or (height, width); a usage error naming the option otherwise."""
        if isinstance(value, (int, tuple)):
            return value
        parts = str(value).lower().split("x")
        if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) >= 8 for p in parts):
            return int(parts[0]) if len(parts) == 1 else (int(parts[1]), int(parts[0]))
        self.fail(f"{value!r} is not a size: give a side (512) or WIDTHxHEIGHT (768x512), each at least 8",
                  param, ctx)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device must name a device this machine has ('auto' picks one)."""
    import torch

    if value == "auto":
        return value
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"unknown device {value!r} (try cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and (dev.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        has = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise click.BadParameter(f"{value!r} is not available: this machine has {has} (torch {torch.__version__})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r} is not available on this machine")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="latentdiff")
def cli() -> None:
    """latentdiff: train and run latent diffusion models (the Stable Diffusion family)."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("preset_or_yaml")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--steps", type=click.IntRange(min=1), help="Total optimiser steps (overrides train.steps).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/PRESET).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint "
              "(model, EMA, optimiser, data order and RNG), up to --steps.")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="auto, cpu, cuda, cuda:1, ...")
def train(preset_or_yaml: str, overrides: tuple[str, ...], steps: int | None, out: Path | None,
          resume: bool, device: str) -> None:
    """Train a diffusion model, an autoencoder or a CLIP model from a preset (`latentdiff presets`) or a YAML file.

    Overrides look like `train.lr=1e-4 data.source=path/to/images unet.model_channels=64`. Started as
    `torchrun --nproc-per-node N -m latentdiff train ...` it trains data-parallel on N processes;
    train.batch_size is then the global batch of a step (README: Training on several GPUs).
    """
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    out = out or Path("runs") / Path(preset_or_yaml).stem
    if resume and (out / "config.yaml").is_file():
        cfg = _resumed_config(out, preset_or_yaml, list(overrides))
    else:
        cfg = load_config(preset_or_yaml, list(overrides))
    if steps is not None:
        cfg.train.steps = steps
    from latentdiff.training import distributed

    try:  # under torchrun every process runs this; rank 0 writes and reports
        trainer = make_trainer(cfg, out, resume=resume, device=device)
        grid = trainer.run()
    finally:
        distributed.teardown()
    if trainer.dist.is_main:
        click.echo(f"model: {out}")
        if grid:
            click.echo(f"samples: {grid}")


def _resumed_config(out: Path, preset: str, overrides: list[str]):
    """On --resume the run's own config.yaml is authoritative; only train.* may be overridden.

    Other overrides must repeat the run's values, so the command that started a run also resumes it.
    """
    from latentdiff.training.config import load_config

    train = [o for o in overrides if o.startswith("train.")]
    saved = load_config(str(out / "config.yaml"), train)
    asked = load_config(str(out / "config.yaml"), overrides)
    bad = [o for o in overrides if o not in train and _setting(asked, o) != _setting(saved, o)]
    if bad:  # anything else would change the model or its data
        has = ", ".join(f"{_key(o)}={_setting(saved, o)!r}" for o in bad)
        raise UserError(f"--resume keeps the run's data, unet and diffusion settings; cannot apply "
                        f"{', '.join(bad)} (the run has {has})")
    return saved


def _key(override: str) -> str:
    return override.partition("=")[0]


def _setting(cfg, override: str):
    """The value a ``section.key=value`` override addresses in ``cfg``."""
    section, _, key = _key(override).partition(".")
    return getattr(getattr(cfg, section), key)


def _condition_options(f):
    """What a conditional model is told: a class or a prompt, and the guidance scale."""
    for opt in reversed([
        click.option("--class-label", type=int, default=None, help="Class index for class-conditional models."),
        click.option("--prompt", default=None, help="Text for text-conditional models (cut to the encoder's context)."),
        click.option("--negative-prompt", default=None,
                     help="Text to steer away from (replaces the empty prompt in classifier-free guidance)."),
        click.option("--guidance", type=Finite(), default=None,
                     help="Classifier-free guidance scale (1: none; default: the model's own, from training).")]):
        f = opt(f)
    return f


def _model_options(f):
    """How to load a model: Stable Diffusion overrides and the memory savers."""
    for opt in reversed([
        click.option("--size", default=None, type=ImageSize(),
                     help="Image side, or WIDTHxHEIGHT, in pixels (default: the model's square; SD v1 512, v2 768)."),
        click.option("--prediction", default=None, type=click.Choice(["eps", "v"]),
                     help="Stable Diffusion single files only: override what the UNet predicts (read from the file)."),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
                     help="UNet and text encoder weights in bf16 (half the memory; the VAE stays fp32)."),
        click.option("--attention-slice", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Compute attention for this many heads at a time (0: all); less memory on large images."),
        click.option("--vae-tile", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Decode and encode in overlapping latent tiles of this side (0: whole image)."),
    ]):
        f = opt(f)
    return f


def _load_model(path: Path, device: str, size: int | tuple[int, int] | None = None, prediction: str | None = None,
                precision: str = "fp32", attention_slice: int = 0, vae_tile: int = 0):
    """Any model: a latentdiff model folder, a diffusers SD folder or an SD .safetensors/.ckpt file."""
    from latentdiff.pipelines.stable_diffusion import load_any

    pipe = load_any(path, device, prediction)
    pipe.configure(size=size, precision=precision, attention_slice=attention_slice, vae_tile=vae_tile)
    return pipe


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "layout", default="latentdiff", show_default=True, type=click.Choice(["latentdiff", "diffusers"]),
              help="Layout of DST: a latentdiff model folder or a diffusers pipeline folder.")
@click.option("--prediction", default=None, type=click.Choice(["eps", "v"]),
              help="Single files: override what the UNet predicts (default: read from the file).")
@click.option("--size", default=None, type=click.IntRange(min=8), help="Default image side stored in DST.")
def convert(src: Path, dst: Path, layout: str, prediction: str | None, size: int | None) -> None:
    """Convert a Stable Diffusion checkpoint (single file or diffusers folder) or a model folder to SRC's twin."""
    from latentdiff.pipelines.stable_diffusion import load_any, save_diffusers, save_latentdiff

    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; choose a new folder")
    pipe = load_any(src, "cpu", prediction)
    pipe.configure(size=size)
    (save_diffusers if layout == "diffusers" else save_latentdiff)(pipe, dst)
    click.echo(f"{src} -> {dst} ({layout} layout; {pipe.manifest.get('source', 'latentdiff model')}, "
               f"{pipe.manifest['image_size']} px, predicts {pipe.diffusion.prediction})")


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model", default=None, type=click.Path(path_type=Path),
              help="Instead of RUN_DIR: a model folder, a diffusers SD folder or an SD .safetensors/.ckpt file.")
@_model_options
@click.option("--n-samples", default=16, show_default=True, type=click.IntRange(min=1), help="Images to draw.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per network call; memory depends on this, not on --n-samples.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampler steps (NFE).")
@click.option("--sampler", default="ddim", show_default=True,
              help="ddpm, ddim, euler, euler_ancestral, heun, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, "
                   "dpm_adaptive (docs/samplers.md maps them to the names other tools use).")
@click.option("--spacing", default="trailing", show_default=True,
              help="Timesteps: trailing, leading, linspace; or σ grids karras, exponential "
                   "('DPM++ 2M Karras' is --sampler dpmpp_2m --spacing karras).")
@click.option("--eta", default=None, type=Finite(min=0),
              help="Noise of ddim / euler_ancestral / dpmpp_*_sde: 0 deterministic, 1 ancestral.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Image i uses seed+i, whatever the batch size.")
@_condition_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"),
              show_default=True, help="Folder for the PNGs and grid.png.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="cpu, cuda, ...")
def sample(run_dir: Path | None, model: Path | None, n_samples: int, batch_size: int, steps: int, sampler: str,
           spacing: str, eta: float | None, seed: int, class_label: int | None, prompt: str | None,
           negative_prompt: str | None, guidance: float | None, out: Path, device: str, **load: Any) -> None:
    """Draw images from a trained model folder or a Stable Diffusion checkpoint; PNGs keep their settings."""
    if (run_dir is None) == (model is None):
        raise UserError("give the model as RUN_DIR or as --model PATH (exactly one)")
    pipe = _load_model(run_dir or model, device, **load)
    t0 = time.perf_counter()
    images, nfe = pipe.generate(n_samples, batch_size, steps, sampler, seed, class_label=class_label, eta=eta,
                                prompt=prompt, negative_prompt=negative_prompt, guidance=guidance,
                                spacing=spacing, return_nfe=True)
    dt = time.perf_counter() - t0
    settings = {"sampler": sampler, "spacing": spacing, "steps": steps, "nfe": nfe, "eta": eta, "seed": seed,
                "class_label": class_label, "prompt": prompt, "negative_prompt": negative_prompt,
                "guidance": guidance}
    paths, grid = pipe.save(images, out, settings)
    click.echo(f"{len(paths)} images in {out} ({dt / n_samples:.3f} s/image, {sampler} {spacing}, "
               f"{nfe:g} network evaluations per image); grid: {grid}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for both models, the prompt grid and the adherence report.")
@click.option("--ae-minutes", default=2.7, show_default=True, type=Finite(min=0.1),
              help="Time limit of the autoencoder's training (its 700 steps: ~2.5 min on 2 CPU cores).")
@click.option("--ldm-minutes", default=6.0, show_default=True, type=Finite(min=0.1),
              help="Time limit of the text-conditional LDM's training (its 2 000 steps: ~5.4 min).")
@click.option("--n-eval", default=100, show_default=True, type=click.IntRange(min=1),
              help="Prompts per adherence set (one object seen / unseen, two objects).")
@click.option("--guidance", type=Finite(min=0), default=None,
              help="Guidance scale for the grid and the scores (default: the model's own).")
def demo(out: Path, ae_minutes: float, ldm_minutes: float, n_eval: int, guidance: float | None) -> None:
    """Text-to-image from scratch: train an autoencoder and a text-conditional LDM on the embedded shapes,
    draw a grid of prompts and print how well the images follow them."""
    from latentdiff.pipelines.demo import run_demo

    t0 = time.perf_counter()
    summary = run_demo(out, ae_minutes, ldm_minutes, n_eval, guidance, log=lambda m: click.echo(m, err=True))
    click.echo(f"\nprompt adherence (model-free scorer, guidance {summary['guidance']:g}):\n{summary['table']}")
    click.echo(f"\ndiversity of the grid's prompts (spread over seeds / the data's):\n{summary['diversity_table']}")
    click.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; model: {out / 'ldm'}")
    click.echo(f"prompt grid: {summary['grid']}; try: latentdiff sample {out / 'ldm'} --prompt "
               "\"a large blue circle at the top left\"")


def _sampling_options(f):
    """The options every image-making command shares."""
    for opt in reversed([
        click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampler steps."),
        click.option("--sampler", default="ddim", show_default=True, help="Any sampler of `latentdiff sample`."),
        click.option("--spacing", default="trailing", show_default=True, help="As for `latentdiff sample`."),
        click.option("--eta", default=None, type=Finite(min=0), help="As for `latentdiff sample`."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
                     help="Output i uses seed+i."),
        click.option("--n-samples", default=4, show_default=True, type=click.IntRange(min=1), help="Outputs."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="Images per network call; memory depends on this."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"),
                     show_default=True, help="Folder for the PNGs and grid.png."),
        click.option("--device", default="cpu", show_default=True, callback=_check_device,
                     help="cpu, cuda, ...")]):
        f = opt(f)
    return f


def _read_input(path: Path, pipe):
    """An image file as uint8 (1, C, H, W) at the model's size and channels."""
    from latentdiff.data.datasets import read_image

    return read_image(path, pipe.image_hw, pipe.manifest["channels"])[None]


def _run_task(pipe, images, settings: dict, out: Path, **kwargs) -> None:
    t0 = time.perf_counter()
    result, nfe = pipe.generate(images=images, return_nfe=True, **kwargs)
    settings = settings | {"nfe": nfe, "seconds_per_image": (time.perf_counter() - t0) / len(result)}
    paths, grid = pipe.save(result, out, settings)
    click.echo(f"{len(paths)} images in {out} ({nfe:g} network evaluations each); grid: {grid}")


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--strength", default=0.6, show_default=True, type=Finite(0, 1),
              help="How far to noise the input: 0 returns it, 1 ignores it (SDEdit).")
@_sampling_options
@_condition_options
def img2img(model_dir: Path, image: Path, strength: float, steps: int, sampler: str, spacing: str,
            eta: float | None, seed: int, n_samples: int, batch_size: int, out: Path, device: str,
            **conditions: Any) -> None:
    """Redraw IMAGE: noise it to --strength and denoise with the model (SDEdit)."""
    pipe = _load_model(model_dir, device)
    settings = {"task": "img2img", "input": str(image), "strength": strength, "sampler": sampler,
                "spacing": spacing, "steps": steps, "eta": eta, "seed": seed} | conditions
    _run_task(pipe, _read_input(image, pipe), settings, out, n_samples=n_samples, batch_size=batch_size,
              steps=steps, sampler=sampler, seed=seed, eta=eta, spacing=spacing, strength=strength, **conditions)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@click.option("--resample", default=1, show_default=True, type=click.IntRange(min=1),
              help="RePaint: repeat each step this often, re-noising in between (better seams, more NFE).")
@_sampling_options
@_condition_options
def inpaint(model_dir: Path, image: Path, mask: Path, resample: int, steps: int, sampler: str, spacing: str,
            eta: float | None, seed: int, n_samples: int, batch_size: int, out: Path, device: str,
            **conditions: Any) -> None:
    """Redraw the white part of MASK (a PNG) in IMAGE; the rest is kept exactly."""
    pipe = _load_model(model_dir, device)
    from latentdiff.data.masks import read_mask

    m = read_mask(mask, pipe.image_hw)
    settings = {"task": "inpaint", "input": str(image), "mask": str(mask), "resample": resample,
                "sampler": sampler, "spacing": spacing, "steps": steps, "eta": eta, "seed": seed} | conditions
    _run_task(pipe, _read_input(image, pipe), settings, out, n_samples=n_samples, batch_size=batch_size,
              steps=steps, sampler=sampler, seed=seed, eta=eta, spacing=spacing, mask=m, resample=resample,
              **conditions)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--input", "low_res", required=True, type=click.Path(path_type=Path),
              help="The low-resolution image, at the model's low_res_size (model_index.json).")
@_sampling_options
@_condition_options
def upscale(model_dir: Path, low_res: Path, steps: int, sampler: str, spacing: str, eta: float | None, seed: int,
            n_samples: int, batch_size: int, out: Path, device: str, **conditions: Any) -> None:
    """Super-resolution with an SR3 model (cond.concat=low_res): --n-samples different high-resolution images."""
    pipe = _load_model(model_dir, device)
    if pipe.concat_kind != "low_res":
        raise UserError(f"{model_dir} is not a super-resolution model (train one with cond.concat=low_res, "
                        "e.g. latentdiff train sr-fashion)")
    y = _read_low_res(low_res, pipe.manifest["low_res_size"], pipe.manifest["channels"])
    settings = {"task": "upscale", "input": str(low_res), "sampler": sampler, "spacing": spacing, "steps": steps,
                "eta": eta, "seed": seed} | conditions
    t0 = time.perf_counter()
    result, nfe = pipe.generate(n_samples=n_samples, batch_size=batch_size, steps=steps, sampler=sampler, seed=seed,
                                eta=eta, spacing=spacing, low_res=y, return_nfe=True, **conditions)
    settings |= {"nfe": nfe, "seconds_per_image": (time.perf_counter() - t0) / len(result)}
    paths, grid = pipe.save(result, out, settings)
    click.echo(f"{len(paths)} images in {out} ({nfe:g} network evaluations each); grid: {grid}")


def _read_low_res(path: Path, size: int, channels: int):
    """A low-resolution input as uint8 (1, C, size, size); any other size is refused, not resized."""
    from PIL import Image, UnidentifiedImageError

    from latentdiff.data.datasets import read_image

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


@cli.group()
def viz() -> None:
    """Draw the method: forward noising, the reverse trajectory, the noise schedules."""


@viz.command("forward")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--t", "ts", default="0,100,250,500,750,999", show_default=True, help="Timesteps, comma-separated.")
@click.option("--schedule", default="linear", show_default=True, help="linear, cosine or scaled_linear.")
@click.option("--num-timesteps", default=1000, show_default=True, type=click.IntRange(min=2), help="T of the schedule.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Use this model's schedule instead.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help="Seed of the noise ε.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Resize the image first.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("forward.png"), show_default=True,
              help="PNG to write.")
def viz_forward(image: Path, ts: str, schedule: str, num_timesteps: int, model: Path | None, seed: int,
                image_size: int | None, out: Path) -> None:
    """IMAGE noised by q(z_t | x) (20.8) at the chosen timesteps, as one labelled strip."""
    from latentdiff.data.images import save_png
    from latentdiff.diffusion import Schedule
    from latentdiff.pipelines.viz import forward_strip, parse_timesteps

    if model is not None:
        from latentdiff.pipelines.generate import Pipeline

        sched = Pipeline.load(model).diffusion.build_schedule()
    else:
        sched = Schedule.from_name(schedule, num_timesteps)
    steps = parse_timesteps(ts)
    save_png(forward_strip(str(image), sched, steps, seed, image_size), out, {"viz": "forward", "t": steps})
    click.echo(f"forward noising: {out}")


@viz.command("reverse")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--sampler", default="ddim", show_default=True, help="Any sampler of `latentdiff sample`.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampler steps.")
@click.option("--spacing", default="trailing", show_default=True, help="As for `latentdiff sample`.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help="Seed of the sample.")
@_condition_options
@click.option("--eta", default=None, type=Finite(min=0), help="As for `latentdiff sample`.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("reverse.png"), show_default=True,
              help="PNG strip to write.")
@click.option("--gif", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also an animated GIF.")
@click.option("--every", default=1, show_default=True, type=click.IntRange(min=1), help="GIF: one frame every N steps.")
@click.option("--duration-ms", default=80, show_default=True, type=click.IntRange(min=10), help="GIF frame time.")
def viz_reverse(model_dir: Path, sampler: str, steps: int, spacing: str, seed: int, class_label: int | None,
                prompt: str | None, negative_prompt: str | None, guidance: float | None,
                eta: float | None, out: Path, gif: Path | None, every: int, duration_ms: int) -> None:
    """The reverse trajectory of one sample: x_t above, the predicted x̂0 below, step by step."""
    from latentdiff.data.images import save_png
    from latentdiff.pipelines.generate import Pipeline
    from latentdiff.pipelines.viz import reverse_trajectory, save_gif

    pipe = Pipeline.load(model_dir)
    options = {"eta": eta} if eta is not None else {}
    strip, frames = reverse_trajectory(pipe, sampler, steps, seed, spacing, every=every, class_label=class_label,
                                       prompt=prompt, negative_prompt=negative_prompt, guidance=guidance, **options)
    save_png(strip, out, {"viz": "reverse", "sampler": sampler, "steps": steps, "seed": seed, "model": str(model_dir)})
    click.echo(f"reverse trajectory: {out}")
    if gif:
        save_gif(frames, gif, duration_ms)
        click.echo(f"animation: {gif}")


@viz.command("schedules")
@click.option("--names", default="linear,cosine,scaled_linear", show_default=True, help="Schedules, comma-separated.")
@click.option("--num-timesteps", default=1000, show_default=True, type=click.IntRange(min=2), help="T of the schedules.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Sampler steps shown.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("schedules.png"), show_default=True,
              help="PNG to write.")
def viz_schedules(names: str, num_timesteps: int, steps: int, out: Path) -> None:
    """ᾱ_t, log-SNR and the timesteps each spacing visits, for the named schedules."""
    from latentdiff.pipelines.viz import schedule_plots

    schedule_plots(tuple(n.strip() for n in names.split(",") if n.strip()), num_timesteps, steps, out)
    click.echo(f"schedules: {out}")


@cli.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--n-samples", default=1000, show_default=True, type=click.IntRange(min=10),
              help="Generated images (and held-out real images) to compare; compare FIDs only at equal n.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(min=1),
              help="Images per network call while sampling.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampler steps (NFE).")
@click.option("--sampler", default="ddim", show_default=True, help="Any sampler of `latentdiff sample`.")
@click.option("--spacing", default="trailing", show_default=True, help="As for `latentdiff sample`.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help="Sample i uses seed+i.")
@click.option("--features", default=None, help="domain:fashion-mnist | domain:mnist5k | domain:PATH | "
              "inception:PATH (FID Inception weights). Default: the data set's shipped classifier.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the JSON here.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="cpu, cuda, ...")
def eval_cmd(model_dir: Path, n_samples: int, batch_size: int, steps: int, sampler: str, spacing: str, seed: int,
             features: str | None, out: Path | None, device: str) -> None:
    """Measure a model folder: FID, CMMD, precision/recall of samples, or PSNR/SSIM/rFID of an autoencoder."""
    import json

    from latentdiff.formats.checkpoint import save_json
    from latentdiff.models.folder import read_manifest
    from latentdiff.pipelines.evaluate import evaluate_reconstruction, evaluate_samples

    manifest = read_manifest(model_dir)
    if "unet" in manifest["components"]:
        report = evaluate_samples(model_dir, n_samples, batch_size, steps, sampler, seed, features,
                                  spacing=spacing, device=device)
    else:
        report = evaluate_reconstruction(model_dir, n_samples, features, device)
    click.echo(json.dumps(report, indent=2, sort_keys=True))
    if out:
        save_json(report, out)


@cli.command()
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A model folder, diffusers SD folder or SD .safetensors/.ckpt file; repeat for more.")
@click.option("--runs", "runs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder of training runs to list (default: ./runs if it exists); repeat for more.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; loopback keeps it private.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--max-steps", default=150, show_default=True, type=click.IntRange(min=1), help="Most sampler steps per job.")
@click.option("--max-size", default=1024, show_default=True, type=click.IntRange(min=8), help="Largest image side.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Most images per job.")
@click.option("--queue", default=8, show_default=True, type=click.IntRange(min=1),
              help="Jobs that may wait behind the running one; more are refused with 429 (busy).")
@click.option("--preview-every", default=5, show_default=True, type=click.IntRange(min=0),
              help="Show the predicted image every N steps while sampling (one autoencoder decode each); 0: never.")
@click.option("--keep-jobs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Finished jobs the server remembers (their PNGs stay in --out).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"), show_default=True,
              help="Folder for result PNGs (one subfolder per job).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow scripts on this origin to call the API (CORS is closed by default).")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="cpu, cuda, ...")
def serve(models: tuple[Path, ...], runs: tuple[Path, ...], host: str, port: int, max_steps: int, max_size: int,
          max_batch: int, queue: int, preview_every: int, keep_jobs: int, out: Path, cors_origins: tuple[str, ...],
          device: str) -> None:
    """Start the web app and its JSON API (docs/server.md); binds to loopback unless --host says otherwise."""
    try:
        import uvicorn

        from latentdiff.server import Limits, create_app, load_models
    except ImportError as e:
        raise UserError(f"the web app needs the 'serve' extra: pip install 'latentdiff[serve]' ({e})") from None
    run_roots = list(runs) or ([Path("runs")] if Path("runs").is_dir() else [])
    limits = Limits(max_steps, max_size, max_batch, queue, preview_every, keep_jobs)
    app = create_app(load_models(list(models), device), limits, out, run_roots, list(cors_origins))
    where = "loopback only: other machines cannot connect" if host in ("127.0.0.1", "localhost", "::1") else \
        "ALL machines that can reach this address may use it (no authentication)"
    click.echo(f"serving {len(models)} model(s) on http://{host}:{port}/ ({where}); API docs at /docs")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command()
def presets() -> None:
    """List the training presets that ship with latentdiff."""
    from latentdiff.training.config import list_presets

    for name in list_presets():
        click.echo(name)


def main() -> None:
    """Entry point: run the CLI; user errors print one line and exit with code 2."""
    # warnings of the library (a prompt truncated, a mask resized) read as one line, like errors
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad option value, unknown option or command: one line too
        see = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"error: {e.format_message()}{see}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; the last checkpoint is intact (use --resume)", err=True)
        sys.exit(130)
