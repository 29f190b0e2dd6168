"""Run configuration: typed dataclasses per component, YAML presets, ``key=value`` overrides.

A run's config is saved into every checkpoint, so everything needed to rebuild a model is in it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from latentdiff.data.config import DataConfig
from latentdiff.diffusion import SAMPLERS
from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import build_dataclass, check_choice, check_positive, check_type, to_plain
from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.models.concat import CONCAT_KINDS
from latentdiff.models.unet import UNetConfig
from latentdiff.training.ae_loss import AutoencoderLossConfig
from latentdiff.training.clip_config import CLIPTrainConfig

MODELS = ("diffusion", "autoencoder", "clip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LatentConfig:
    """Where diffusion runs: on pixels (no autoencoder) or on the latents of a trained autoencoder."""

    autoencoder: str | None = None  # model folder of a trained autoencoder (latentdiff train ae-*); None: pixels
    sample_posterior: bool = True  # train on z ~ q(z|x) (LDM) rather than its mean; moments are cached


@dataclass
class CondConfig:
    """What the denoiser is told: a class (unet.num_classes) or a prompt (unet.context_dim), and CFG settings."""

    drop_prob: float = 0.1  # training replaces the label by the null class / the caption by "" this often (CFG)
    text_encoder: str = "minilm"  # "minilm" (packaged, frozen) or a model folder from `latentdiff train clip-*`
    context_length: int = 32  # tokens of context the minilm encoder gives (a CLIP encoder has its own)
    guidance: float = 4.0  # classifier-free guidance scale for preview grids and the default at sampling
    guidance_max_t: float | None = None  # guide only the steps with t <= this (the noisiest keep their spread)
    # channels concatenated to z_t (models/concat.py): "inpaint" (mask + masked-image latent, SD inpainting's
    # layout) or "low_res" (the upsampled low-resolution image, SR3 / SD's upscaler); null: none
    concat: str | None = None
    low_res_size: int = 0  # concat=low_res: side of the low-resolution input; training downsamples to it
    mask_full_prob: float = 0.25  # concat=inpaint: share of training masks that cover the whole image (SD: 25 %)

    def __post_init__(self) -> None:
        if not 0 <= self.drop_prob < 1:
            raise UserError(f"cond.drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.concat is not None:
            check_choice("cond.concat", self.concat, CONCAT_KINDS)
        if (self.concat == "low_res") != (self.low_res_size > 0):
            raise UserError(f"cond.low_res_size ({self.low_res_size}) must be > 0 exactly when cond.concat is "
                            f"low_res (got concat={self.concat!r})")
        if not 0 <= self.mask_full_prob <= 1:
            raise UserError(f"cond.mask_full_prob must be in [0, 1], got {self.mask_full_prob}")
        if not self.guidance >= 0:
            raise UserError(f"cond.guidance must be >= 0, got {self.guidance}")
        if self.guidance_max_t is not None and not self.guidance_max_t >= 0:
            raise UserError(f"cond.guidance_max_t must be >= 0 (or null: every step), got {self.guidance_max_t}")
        check_positive("cond.context_length", self.context_length)


@dataclass
class TrainConfig:
    """Optimisation, EMA, logging and checkpointing of a training run. Durations count optimiser steps."""

    steps: int = 2000  # total optimiser steps (a time_budget plans its own; training/plan.py)
    time_limit: float = 0.0  # stop (and save) after this many minutes of training in this process; 0: no limit
    # plan the run to end, annealed, saved and exported, within this many minutes of this process (the CLI's
    # --minutes): steps, LR decay, EMA length, checkpoints from a calibration of real steps; 0: no budget
    time_budget: float = 0.0
    # global batch per optimiser step: processes × grad_accum × per-process micro-batch; "auto": the batch that
    # fills the device (doubling from lr_batch while images/s rise ≥ 1.3x), lr scaled by √(batch / lr_batch)
    batch_size: int | str = 128
    lr_batch: int = 0  # the batch lr was tuned at (batch_size=auto scales from it); 0: batch_size
    grad_accum: int = 1  # micro-batches whose gradients add up to one step (same step, less memory)
    lr: float = 2e-4  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up from 0 to lr (Adam's early moments are noisy)
    lr_schedule: str = "constant"  # after warm-up: constant or cosine (decays to 0 at `steps`)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.999  # EMA of the weights, used for sampling; warmed up as min(decay, (1+n)/(10+n))
    init_unet: str | None = None  # start from this model folder's UNet weights (same config; added concat input
    #                               channels start at zero, as SD inpainting started from SD); None: random init
    seed: int = 0
    # autocast of the forward: fp32 (none), bf16 (CPU, GPU), fp16 (GPU; with a GradScaler), or auto: bf16 on a
    # GPU that has it and on a CPU with bf16 units (AVX-512 BF16, AMX), else fp32 (benchmarks/cpu_step_options.py)
    precision: str = "auto"
    compile: bool = False  # torch.compile the trained network's forward (first steps slower; never required)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    log_every: int = 50  # steps between metrics.csv rows
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <run>/tensorboard
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (always one at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    max_bad_steps: int = 20  # skip steps with a non-finite loss; stop with an error after this many
    grid_samples: int = 64  # images in the sample grid
    grid_steps: int = 50  # sampler steps for the grid
    grid_sampler: str = "ddim"

    def __post_init__(self) -> None:
        for key in ("steps", "grad_accum"):
            check_positive(f"train.{key}", getattr(self, key))
        if self.batch_size == "auto":
            if self.lr_batch <= 0:
                raise UserError("train.batch_size=auto needs train.lr_batch, the batch train.lr was tuned at "
                                "(a preset's own batch_size when overridden on the command line)")
        elif isinstance(self.batch_size, str):
            raise UserError(f"train.batch_size: expected a number or auto, got {self.batch_size!r}")
        else:
            check_positive("train.batch_size", self.batch_size)
        if self.lr_batch < 0:
            raise UserError(f"train.lr_batch must be >= 0, got {self.lr_batch}")
        check_choice("train.precision", self.precision, PRECISIONS)
        for key in ("warmup_steps", "log_every", "sample_every", "checkpoint_every", "threads", "max_bad_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("time_limit", "time_budget"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} must be >= 0 minutes, got {getattr(self, key)}")
        # YAML reads .inf and .nan as floats
        for key in ("lr", "weight_decay", "grad_clip", "time_limit", "time_budget"):
            if not math.isfinite(getattr(self, key)):
                raise UserError(f"train.{key} must be a finite number, got {getattr(self, key)}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"train.seed must be in [0, 2**63), got {self.seed}")
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("train.grid_sampler", self.grid_sampler, tuple(SAMPLERS))
        check_positive("train.keep_checkpoints", self.keep_checkpoints)
        check_positive("train.grid_samples", self.grid_samples)
        check_positive("train.grid_steps", self.grid_steps)


@dataclass
class RunConfig:
    """Everything a training run needs; saved as config.yaml in the run folder.

    ``model`` says what is trained: a diffusion model (sections unet, diffusion, latent) or an
    autoencoder (sections autoencoder, ae_loss) or a CLIP model (section clip); data and train apply to all.
    """

    model: str = "diffusion"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ae_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    clip: CLIPTrainConfig = field(default_factory=CLIPTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODELS)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), for YAML and JSON."""
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        """Build from a nested dict, checking every key and type; errors name the key."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping of sections, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise UserError(f"{where}: unknown section(s) {', '.join(map(str, unknown))}; known: {', '.join(hints)}")
        d = _without_removed_keys(d, where)
        model = check_type(d.get("model", "diffusion"), str, "model")
        sections = [k for k in hints if k != "model"]
        return cls(model=model, **{k: build_dataclass(hints[k], d.get(k) or {}, k) for k in sections})


def _without_removed_keys(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse train.bf16 (replaced by train.precision) by name, unless it is what older versions wrote.

    Run folders of older versions hold ``bf16: <precision == bf16>`` in config.yaml; that value agrees
    with train.precision and is dropped, so those runs still resume. Any other use would change nothing
    silently, so it is an error.
    """
    train = d.get("train")
    if not isinstance(train, dict) or "bf16" not in train:
        return d
    train = dict(train)
    legacy = train.pop("bf16")
    if legacy is not (train.get("precision", "fp32") == "bf16"):
        raise UserError(f"{where}: train.bf16 was removed: use train.precision=bf16 (or fp32, fp16)")
    return {**d, "train": train}


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); "
                        "save the YAML file as UTF-8") from None


def list_presets() -> list[str]:
    """Names of the YAML presets that ship in latentdiff/configs."""
    return sorted(p.name[:-5] for p in resources.files("latentdiff.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(preset_or_path: str, overrides: list[str] = ()) -> RunConfig:
    """A preset name or YAML path, with ``section.key=value`` overrides (values parsed as YAML).

    A config with ``model: lora`` (the ``lora`` preset) gives a LoraRunConfig instead.
    """
    path = Path(preset_or_path)
    if preset_or_path in list_presets():
        text = resources.files("latentdiff.configs").joinpath(f"{preset_or_path}.yaml").read_text()
        where = f"preset {preset_or_path}"
    elif path.is_file():
        text, where = _read_utf8(path), str(path)
    else:
        raise UserError(f"{preset_or_path!r} is neither a preset ({', '.join(list_presets())}) nor a YAML file")
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise UserError(f"{where}: section {section!r} is not a mapping")
        if (section, name, value) == ("train", "batch_size", "auto") and isinstance(d["train"].get("batch_size"), int):
            d["train"].setdefault("lr_batch", d["train"]["batch_size"])  # auto scales from the preset's own pair
        d[section][name] = value
    if d.get("model") == "lora":  # a LoRA run has its own sections (training/lora_config.py)
        from latentdiff.training.lora_config import LoraRunConfig  # it builds on this module's TrainConfig

        return LoraRunConfig.from_dict(d, where)
    return RunConfig.from_dict(d, where)
