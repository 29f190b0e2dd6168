"""Option types and the option blocks the commands share: one block for every image-making command.

Options that are generation settings default to None: unset, SampleSettings' own default applies, the one
set of defaults the web API uses too. ``--help`` shows it (that alone imports the library, and torch).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from latentdiff.errors import SettingError, UserError


class Finite(click.FloatRange):
    """A float (optionally within bounds) that is not NaN or infinite; click's FloatRange lets NaN through."""

    name = "finite float"

    def _describe_range(self) -> str:
        """No '[x<=None]' in --help when there are no bounds."""
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        """The float, or a usage error naming the option."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class Text(click.ParamType):
    """Text (a prompt, a name): refused with the offending byte when the command line held bytes that are not
    valid in the locale's encoding (Python keeps them as lone surrogates, which no tokenizer or file takes)."""

    name = "text"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        """The text, or a usage error naming the option and the first invalid byte."""
        problem = undecodable(value)
        if problem:
            self.fail(problem, param, ctx)
        return value


def undecodable(value: Any) -> str:
    """Why ``value`` (a command-line string) is not text in the locale's encoding; "" when it is."""
    if not isinstance(value, str):
        return ""
    bad = next((i for i, c in enumerate(value) if "\udc80" <= c <= "\udcff"), None)
    if bad is None:
        return ""
    encoding = sys.getfilesystemencoding()
    shown = value.encode(encoding, "surrogateescape").decode(encoding, "backslashreplace")
    return (f"'{shown[:60]}': byte 0x{ord(value[bad]) - 0xDC00:02x} (character {bad}) is not valid in the "
            f"locale's encoding, {encoding}; give the text in {encoding}")


class OutputPath(click.Path):
    """An output folder (or file) checked at once: not below a regular file, not a special file, writable
    (formats/paths.py); so a bad --out ends before any model is loaded or step is run."""

    def __init__(self, folder: bool = True) -> None:
        super().__init__(file_okay=not folder, dir_okay=folder, path_type=Path)
        self.folder = folder

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """The path, or a UserError naming the option and what is wrong."""
        from latentdiff.formats.paths import check_output_file, check_output_folder

        path = Path(value)
        label = (param.opts[0] if isinstance(param, click.Option) else param.human_readable_name) if param else "output"
        (check_output_folder if self.folder else check_output_file)(path, label)
        return path


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


class SettingOption(click.Option):
    """A generation setting: None when not given (SampleSettings' default applies), that default shown in --help."""

    def __init__(self, *args: Any, shown: Optional[Callable[[], Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shown = shown

    def get_help_record(self, ctx: click.Context) -> Optional[tuple[str, str]]:
        """The option's help line with the library's default."""
        from latentdiff.models.settings import SampleSettings

        record = super().get_help_record(ctx)
        default = self.shown() if self.shown else getattr(SampleSettings, self.name, None)
        return record if record is None or default is None else (record[0], f"{record[1]}  [default: {default}]")


def setting(*decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    """click.option for a generation setting (see SettingOption)."""
    return click.option(*decls, cls=SettingOption, default=None, **kwargs)


def _default_sampler() -> str:
    from latentdiff.models.settings import DEFAULT_SAMPLER, REPLACE_SAMPLER

    return f"{DEFAULT_SAMPLER}; {REPLACE_SAMPLER} to inpaint by replacement"


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
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


def _apply(f: Any, options: list[Callable[[Any], Any]]) -> Any:
    for opt in reversed(options):
        f = opt(f)
    return f


def apply_options(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """A decorator applying click options in their listed order."""
    return lambda f: _apply(f, options)


def condition_options(f: Any) -> Any:
    """What a conditional model is told: a class or a prompt, and the guidance scale."""
    return _apply(f, [
        click.option("--class-label", type=click.IntRange(min=0), default=None,
                     help="Class index for class-conditional models."),
        click.option("--prompt", default=None, type=Text(),
                     help="Text for text-conditional models (cut to the encoder's context)."),
        click.option("--negative-prompt", default=None, type=Text(),
                     help="Text to steer away from (replaces the empty prompt in classifier-free guidance)."),
        click.option("--guidance", type=Finite(min=0), default=None,
                     help="Classifier-free guidance scale (1: none; default: the model's own, from training)."),
        click.option("--guidance-max-t", type=Finite(min=0), default=None,
                     help="Guide only the steps with timestep t <= this, of 1000 (guidance interval: the noisiest "
                          "steps keep the samples' variety); 1000: every step; default: the model's own.")])


def sampling_options(f: Any) -> Any:
    """Which sampler, on which grid, for how many steps, from which seed."""
    return _apply(f, [
        setting("--sampler", shown=_default_sampler, type=Text(),
                help='A name users know ("DPM++ 2M Karras", "Euler a", ...) or ours (dpmpp_2m, ddim, ...); '
                     "docs/samplers.md lists them all."),
        setting("--spacing", type=Text(),
                help="Timesteps: trailing, leading, linspace, lcm; or σ grids karras, exponential, ays (Align Your "
                     "Steps), fitted (few steps; docs/samplers.md) (default: the sampler name's own; trailing for "
                     "our names)."),
        setting("--steps", type=click.IntRange(min=1), help="Sampler steps (network evaluations for most samplers)."),
        click.option("--eta", default=None, type=Finite(min=0),
                     help="Noise of ddim / euler_ancestral / dpmpp_*_sde: 0 deterministic, 1 ancestral."),
        setting("--seed", type=click.IntRange(min=0), help="Image i uses seed+i, whatever the batch size.")])


def single_file_options() -> list[Callable[[Any], Any]]:
    """What a single-file checkpoint does not hold: its config and its tokenizer."""
    return [
        click.option("--config", "config", default=None, type=click.Path(path_type=Path),
                     help="Single files: the model's config (a diffusers folder or config.json, or a CompVis "
                          ".yaml) for head counts, groups and schedule; default: SD's conventions."),
        click.option("--tokenizer", default=None, type=click.Path(file_okay=False, path_type=Path),
                     help="Single files: a CLIP tokenizer folder (vocab.json + merges.txt); default: the shipped one.")]


def model_options(f: Any) -> Any:
    """How to load a model: Stable Diffusion overrides, LoRAs and the memory savers."""
    return _apply(f, [
        click.option("--prediction", default=None, type=click.Choice(["eps", "v"]),
                     help="Stable Diffusion single files only: override what the UNet predicts (read from the file)."),
        *single_file_options(),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                     help="Apply a LoRA (kohya / A1111 or diffusers / PEFT .safetensors) at strength SCALE "
                          "(default 1), fused into the weights; repeat for several."),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
                     help="UNet and text encoder weights in bf16 (half the memory; the VAE stays fp32)."),
        click.option("--attention-slice", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Compute attention for this many heads at a time (0: all); less memory on large images."),
        click.option("--vae-tile", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Decode and encode in overlapping latent tiles of this side (0: whole image).")])


def image_options(f: Any) -> Any:
    """The one options block of every image-making command (sample, img2img, inpaint, upscale)."""
    f = _apply(f, [
        click.option("--size", default=None, type=ImageSize(),
                     help="Image side, or WIDTHxHEIGHT, in pixels (default: the model's square; SD v1 512, v2 768)."),
        setting("--n-samples", type=click.IntRange(min=1), help="Images to draw."),
        setting("--batch-size", type=click.IntRange(min=1),
                help="Images per network call; memory depends on this, not on --n-samples."),
        click.option("--out", type=OutputPath(), default=Path("samples"),
                     show_default=True,
                     help="Folder for the images (written as each batch finishes, named by seed) and grid.png "
                          "(the first 64). A rerun with the same arguments resumes: images already there are "
                          "kept and skipped (by default; --overwrite draws them again)."),
        click.option("--format", "fmt", type=click.Choice(["png", "npz"]), default="png", show_default=True,
                     help="png: one file per image with its settings; npz: one uint8 shard per batch "
                          "(images, seeds, settings), for evaluation pipelines."),
        click.option("--overwrite", is_flag=True, default=False,
                     help="Draw every image again instead of keeping those --out already holds."),
        click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, ...")])
    return model_options(sampling_options(condition_options(f)))


SETTING_PARAMS = ("n_samples", "batch_size", "steps", "sampler", "seed", "spacing", "eta", "guidance",
                  "guidance_max_t", "class_label", "prompt", "negative_prompt", "strength", "resample")


def settings_from(params: dict[str, Any], **fixed: Any) -> Any:
    """SampleSettings from a command's parameters: the given ones, SampleSettings' defaults for the rest."""
    from latentdiff.models.settings import SampleSettings

    given = {k: params[k] for k in SETTING_PARAMS if params.get(k) is not None}
    size = params.get("size")
    if size is not None:
        given["height"], given["width"] = (size, size) if isinstance(size, int) else size
    return SampleSettings(**given | fixed)


def load_model(path: Path, device: str, prediction: Optional[str] = None, precision: str = "fp32",
               attention_slice: int = 0, vae_tile: int = 0, config: Optional[Path] = None,
               tokenizer: Optional[Path] = None, loras: tuple[str, ...] = ()) -> Any:
    """Any model: a latentdiff model folder, a diffusers SD folder or an SD .safetensors/.ckpt file, with LoRAs."""
    from latentdiff.pipelines.lora import load_lora, parse_lora_spec
    from latentdiff.pipelines.stable_diffusion import load_any

    pipe = load_any(path, device, prediction, tokenizer, config)
    for spec in loras:  # fused in full precision, before any bf16 cast
        load_lora(pipe, *parse_lora_spec(spec))
    return pipe.configure(precision, attention_slice, vae_tile)


def naming_options(e: SettingError) -> UserError:
    """A setting's error as the running command says it: the option's name (--seed) for the field (seed)."""
    ctx = click.get_current_context(silent=True)
    field = "size" if e.field in ("width", "height") else e.field
    names = {p.name: p.opts[0] for p in (ctx.command.params if ctx else []) if isinstance(p, click.Option)}
    return UserError(f"{names.get(field, field)}: {e.problem}")
