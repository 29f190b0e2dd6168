"""What one generation asks for: the frozen settings every interface builds (Python, command line, web API).

The defaults here are the only ones: the command line and the web API leave unset values to them.
:meth:`SampleSettings.check` refuses what no model can take; ``Pipeline.check`` adds what a model
cannot (its classes, prompts, timesteps, sizes, tasks). Every refusal is a SettingError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from latentdiff.diffusion.names import resolve
from latentdiff.diffusion.samplers import check_sampler_args
from latentdiff.errors import SettingError
from latentdiff.formats.dataclass_io import ValueEnum
from latentdiff.models.concat import ConcatKind

SEED_MAX = 2**63 - 1  # sample i draws its noise from a CPU generator seeded seed + i
DEFAULT_SAMPLER = "DPM++ 2M Karras"  # what web UIs start with: good images in 20 steps
REPLACE_SAMPLER = "DDIM"  # the default where only one-step samplers work: inpainting by replacement


class Task(ValueEnum):
    """What a generation starts from: noise, an image, an image and a mask, or a low-resolution image."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"

    @property
    def default_strength(self) -> float:
        """How far an input image is noised unless told: SDEdit's 0.6 for img2img, all the way otherwise."""
        return 0.6 if self is Task.IMG2IMG else 1.0

    @classmethod
    def of(cls, images: Any = None, mask: Any = None, low_res: Any = None) -> "Task":
        """The task the given inputs ask for."""
        if low_res is not None:
            return cls.UPSCALE
        if mask is not None:
            return cls.INPAINT
        return cls.IMG2IMG if images is not None else cls.TXT2IMG


# the tasks a model can do, by what it reads beside z_t (models/concat.py), and what to tell a caller otherwise
TASKS: dict[Optional[ConcatKind], tuple[Task, ...]] = {
    None: (Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT), ConcatKind.INPAINT: (Task.INPAINT,),
    ConcatKind.LOW_RES: (Task.UPSCALE,)}
NOT_AN_UPSCALER = ("it is not a super-resolution model: it takes no low-resolution image (train one with "
                   "cond.concat=low_res, e.g. latentdiff train sr-fashion)")
TASK_HINTS: dict[ConcatKind, str] = {
    ConcatKind.INPAINT: "it is an inpainting model: give an image and a mask (Pipeline.inpaint, latentdiff inpaint)",
    ConcatKind.LOW_RES: "it is a super-resolution model: give the low-resolution image (Pipeline.upscale, "
                        "latentdiff upscale)"}


@dataclass(frozen=True)
class SampleSettings:
    """One generation's settings; the first five fields keep ``Pipeline.generate``'s positional order."""

    n_samples: int = 1  # images to draw; image i uses seed + i
    batch_size: int = 16  # images per network call: memory depends on this, not on n_samples
    steps: int = 20  # sampler steps (network evaluations for most samplers)
    sampler: Optional[str] = None  # a name users know or ours (diffusion/names.py); None: DEFAULT_SAMPLER,
    # or REPLACE_SAMPLER to inpaint by replacement
    seed: int = 0
    spacing: Optional[str] = None  # timestep/σ grid; None: the sampler name's own
    eta: Optional[float] = None  # noise of ddim / euler_ancestral / dpmpp_*_sde; None: the sampler's default
    guidance: Optional[float] = None  # classifier-free guidance scale; None: the model's own
    guidance_max_t: Optional[float] = None  # guide only steps with t <= this (guidance interval); None: the model's
    # own; >= the number of timesteps: every step
    class_label: Optional[int | tuple[int, ...]] = None  # one, or one per sample
    prompt: Optional[str | tuple[str, ...]] = None  # one, or one per sample
    negative_prompt: Optional[str | tuple[str, ...]] = None  # replaces the empty prompt in guidance
    strength: float = 1.0  # img2img / inpaint: how far the input is noised (0 keeps it)
    resample: int = 1  # inpainting by replacement: RePaint repeats per step
    width: Optional[int] = None  # image size in pixels; None: the model's own
    height: Optional[int] = None
    options: Mapping[str, float] = field(default_factory=dict)  # further sampler options (order, rtol, ...)

    @classmethod
    def build(cls, *args: Any, **kwargs: Any) -> "SampleSettings":
        """Settings from ``generate``-style arguments: keywords that are no field are sampler options."""
        names = {f.name for f in dataclasses.fields(cls)}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        options = dict(kwargs.pop("options", None) or {}) | options
        for k in ("prompt", "negative_prompt", "class_label"):  # lists are per-sample values
            if isinstance(kwargs.get(k), list):
                kwargs[k] = tuple(kwargs[k])
        return cls(*args, **kwargs | {"options": options})

    def replace(self, **changes: Any) -> "SampleSettings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def resolved(self) -> tuple[str, str]:
        """(our sampler, spacing) that the sampler name and spacing stand for."""
        return resolve(self.sampler or DEFAULT_SAMPLER, self.spacing)

    @property
    def sampler_options(self) -> dict[str, float]:
        """The keyword options the sampler function takes (eta included when set)."""
        return dict(self.options) | ({"eta": self.eta} if self.eta is not None else {})

    def check(self, replace: bool = False) -> "SampleSettings":
        """Refuse values no model can take, with a SettingError naming the field; returns self.

        ``replace``: the run is inpainting by replacement, which only one-step samplers can do. The settings
        returned name their sampler (the default filled in).
        """
        if self.sampler is None:
            return self.replace(sampler=REPLACE_SAMPLER if replace else DEFAULT_SAMPLER).check(replace)
        for name in ("n_samples", "batch_size", "steps", "resample"):
            _positive_int(name, getattr(self, name))
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        n = self.n_samples
        check_seed(self.seed, n)
        if self.guidance is not None and not (_number(self.guidance) and 0 <= self.guidance < math.inf):
            raise SettingError("guidance", f"must be a finite number >= 0, got {self.guidance!r}")
        if self.guidance_max_t is not None and not (_number(self.guidance_max_t) and self.guidance_max_t >= 0):
            raise SettingError("guidance_max_t", f"must be a number >= 0 (a timestep), got {self.guidance_max_t!r}")
        sampler, _ = self.resolved
        check_sampler_args(sampler, self.sampler_options, self.strength, self.resample, replace, self.sampler)
        if self.class_label is not None:
            labels = per_sample(self.class_label, n, "class_label")
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in labels):
                raise SettingError("class_label", f"must be integers >= 0, got {self.class_label!r}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not all(isinstance(p, str) for p in per_sample(value, n, name)):
                raise SettingError(name, f"must be text (one, or one per sample), got {value!r:.80}")
            for text in per_sample(value, n, name) if value is not None else []:
                bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
                if bad is not None:  # no tokenizer takes one; on a command line: bytes not valid in the locale
                    raise SettingError(name, f"character {bad} is a lone surrogate (U+{ord(text[bad]):04X}), "
                                             "not text; give valid Unicode (UTF-8)")
        return self

    def metadata(self, task: Task, hw: tuple[int, int]) -> dict[str, Any]:
        """What PNGs and job records keep: the settings as run, with the sampler resolved, at size ``hw``."""
        sampler, spacing = self.resolved
        meta = {"task": task.value, "sampler": sampler, "spacing": spacing,
                "sampler_name": self.sampler or DEFAULT_SAMPLER, "steps": self.steps, "seed": self.seed,
                "eta": self.eta, "guidance": self.guidance, "class_label": _plain(self.class_label),
                "prompt": _plain(self.prompt), "negative_prompt": _plain(self.negative_prompt),
                "n_samples": self.n_samples, "batch_size": self.batch_size, "width": hw[1], "height": hw[0]}
        if task in (Task.IMG2IMG, Task.INPAINT):
            meta["strength"] = self.strength
        if task is Task.INPAINT:
            meta["resample"] = self.resample
        return meta | dict(self.options)


def check_seed(seed: Any, n: int = 1) -> None:
    """Seeds seed … seed + n - 1 must all fit the CPU generator's range (up to SEED_MAX)."""
    top = SEED_MAX - (n - 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= top:
        raise SettingError("seed", f"must be in [0, {top}] with n_samples={n}, got {seed!r}")


def per_sample(value: Any, n: int, name: str) -> list[Any]:
    """One value for all n samples, or a sequence with one per sample (or a single one)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) not in (1, n):
        raise SettingError(name, f"give one {name} or one per sample (n_samples={n}), got {len(value)}")
    return list(value) * (n // len(value))


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SettingError(name, f"must be a positive integer, got {value!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
