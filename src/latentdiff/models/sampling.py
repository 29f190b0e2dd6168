"""The one generation core: a trained UNet, its autoencoder and conditioner, sampled under SampleSettings.

``Pipeline.generate`` (pipelines/), the reverse-trajectory pictures (pipelines/viz.py) and the trainer's
preview grids (training/) all draw latents through :meth:`LatentSampler.sample_latents`: conditions and
guidance, noise per chunk, the sampler loop of diffusion/samplers.py, progress. It lives in models/, below
training/, so the trainer can use it with its imports pointing down; pipelines compose it with a model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from latentdiff.data.transforms import to_uint8_image
from latentdiff.diffusion import Schedule, as_eps_fn, classifier_free_guidance, regional_guidance, sample
from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.diffusion.samplers import NoiseSource
from latentdiff.diffusion.sigmas import check_grid
from latentdiff.errors import SettingError
from latentdiff.models.autoencoder import Autoencoder, IdentityAutoencoder
from latentdiff.models.concat import with_concat
from latentdiff.models.conditioning import CondKind, Conditioner
from latentdiff.models.unet import UNet
from latentdiff.models.settings import SampleSettings, per_sample


class PerSampleNoise:
    """A noise source that draws each sample's noise from its own CPU generator (seed + i)."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """(len(seeds), *shape[1:]) standard normal noise, one generator per row."""
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.generators])


class SeededNoise:
    """Sample i draws from seed + i on the CPU: an image depends neither on the chunking nor on the device."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def chunk(self, start: int, n: int) -> NoiseSource:
        """The noise of samples start … start + n - 1."""
        return PerSampleNoise(list(range(self.seed + start, self.seed + start + n)))


class ListedNoise:
    """Sample j of the run draws from seeds[j] on the CPU: a subset of a larger run, each sample keeping its seed."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)

    def chunk(self, start: int, n: int) -> NoiseSource:
        """The noise of samples start … start + n - 1."""
        return PerSampleNoise(self.seeds[start:start + n])


class GeneratorNoise:
    """Every draw, for all samples together, from one generator in turn (the trainer's fixed-seed grids)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def chunk(self, start: int, n: int) -> NoiseSource:
        """The same generator for every chunk."""
        return self

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal noise of ``shape`` from the generator."""
        return torch.randn(shape, generator=self.generator)


Noise = SeededNoise | ListedNoise | GeneratorNoise  # where each chunk of a run draws its noise


@dataclass(frozen=True)
class Step:
    """What the callback sees after every sampler step: progress over all chunks, and the current chunk."""

    done: int  # steps finished over all chunks
    total: int  # steps of the whole run (chunks x steps; the adaptive sampler's count is capped at it)
    index: int  # this step's index within the chunk's run
    t: int  # the nearest timestep
    z_t: Tensor  # the chunk's VP latents after the step
    x0: Tensor  # the step's prediction x̂ of the clean latents


@dataclass(frozen=True)
class RegionConditions:
    """Regional prompting (pipelines/regions.py): per region slot the UNet's condition for all N samples, and
    the masks (K, N, 1, h, w) on the latent grid, adding up to 1 at every cell of every sample."""

    conds: tuple[dict[str, Tensor], ...]
    masks: Tensor

    def part(self, part: slice, extra: dict[str, Tensor]) -> list[tuple[dict[str, Tensor], Tensor]]:
        """The (condition, mask) pairs of samples ``part``, each condition with the ``extra`` inputs added."""
        return [({k: v[part] for k, v in c.items()} | extra, m[part]) for c, m in zip(self.conds, self.masks)]


@dataclass(frozen=True)
class Latents:
    """Sampled latents ẑ (N, C, h, w) on the model's device, and network evaluations per sample."""

    z: Tensor
    nfe: float


@dataclass
class LatentSampler:
    """A denoiser ready to sample: the UNet with its autoencoder (identity in pixel space) and conditioner."""

    unet: UNet
    autoencoder: Autoencoder | IdentityAutoencoder
    cond: Conditioner
    diffusion: DiffusionConfig
    image_size: int  # the default side of the images, in pixels
    guidance: float = 1.0  # the guidance scale when the settings give none
    guidance_max_t: Optional[float] = None  # steps with t > max_t run unguided (one pass); None: all guided

    @property
    def device(self) -> torch.device:
        """Where the UNet runs."""
        return next(self.unet.parameters()).device

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's downsamplings."""
        return self.autoencoder.downsample_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    def image_hw(self, settings: Optional[SampleSettings] = None) -> tuple[int, int]:
        """(height, width) of the images ``settings`` ask for (the model's square without a size)."""
        s = settings or SampleSettings()
        return (s.height or self.image_size, s.width or self.image_size)

    def latent_shape(self, settings: Optional[SampleSettings] = None) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises: the image itself in pixel space."""
        f, (h, w) = self.autoencoder.downsample_factor, self.image_hw(settings)
        return (self.autoencoder.latent_channels, h // f, w // f)

    def check(self, settings: SampleSettings, replace: bool = False) -> SampleSettings:
        """``settings.check(replace)`` and what this model cannot take: conditions, steps, sizes (SettingError)."""
        s = settings.check(replace)
        kind = self.cond.kind
        if s.class_label is not None:
            if kind is not CondKind.CLASS:
                raise SettingError("class_label", "this model is not class-conditional; drop the class label")
            classes = self.unet.config.num_classes or 0
            bad = [c for c in per_sample(s.class_label, s.n_samples, "class_label") if c >= classes]
            if bad:
                raise SettingError("class_label", f"{bad[0]} is out of range 0..{classes - 1}")
        for name in ("prompt", "negative_prompt"):
            if getattr(s, name) is not None and kind is not CondKind.TEXT:
                raise SettingError(name, "this model was not trained on captions: it takes no prompt")
        check_grid(self.diffusion.num_timesteps, s.steps, s.resolved[1])
        f = self.size_multiple
        for name in ("width", "height"):
            side = getattr(s, name)
            if side is not None and side % f:
                raise SettingError(name, f"{side} does not fit this model: both sides must be multiples of {f} "
                                         "(its autoencoder and UNet levels)")
        return s

    @torch.no_grad()
    def conditions(self, s: SampleSettings) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
        """The UNet's conditional and unconditional inputs for all samples, and the guidance scale."""
        kind, n = self.cond.kind, s.n_samples
        if kind is CondKind.NONE or (kind is CondKind.CLASS and s.class_label is None):
            return self.cond.null(n), self.cond.null(n), 1.0  # no condition: plain (unconditional) samples
        scale = self.guidance if s.guidance is None else float(s.guidance)
        if kind is CondKind.CLASS:
            return self.cond.labels(torch.tensor(per_sample(s.class_label, n, "class_label"))), self.cond.null(n), scale
        return (self.cond.prompts(per_sample(s.prompt or "", n, "prompt")),
                self.cond.prompts(per_sample(s.negative_prompt or "", n, "negative_prompt")), scale)

    def eps_fn(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], guidance: float, schedule: Schedule,
               regions: Optional[list[tuple[dict[str, Tensor], Tensor]]] = None,
               max_t: Optional[float] = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The UNet as the ε-predictor the samplers take, with classifier-free guidance (regional: each
        region's condition guides only inside its mask, and ``cond`` is not used), guided only at t <= ``max_t``
        (default: the model's own interval)."""
        net = with_concat(self.unet)
        dtype = next(self.unet.parameters()).dtype
        if dtype != torch.float32:  # bf16 weights: the sampler's state stays fp32, only the network runs narrow
            net = _cast_inputs(net, dtype)
        max_t = self.guidance_max_t if max_t is None else max_t
        model_fn = (classifier_free_guidance(net, cond, uncond, guidance, max_t) if regions is None
                    else regional_guidance(net, regions, uncond, guidance, max_t))
        return as_eps_fn(model_fn, schedule, self.diffusion.prediction)

    def sample_latents(self, settings: SampleSettings, noise: Optional[Noise] = None,
                       callback: Optional[Callable[[Step], None]] = None, *, init: Optional[Tensor] = None,
                       mask: Optional[Tensor] = None, concat: Optional[Tensor] = None,
                       regions: Optional[RegionConditions] = None) -> Latents:
        """Draw ``settings.n_samples`` latents, ``batch_size`` at a time, from ``noise`` (default: sample i
        from seed + i). ``init`` (N latents) makes it SDEdit at ``strength``, with the keep-``mask``
        inpainting by replacement; ``concat`` (N, ...) is what a concat model reads beside z_t; ``regions``
        replace the prompt's condition by regional ones (regional guidance, diffusion/guidance.py)."""
        s = self.check(settings, replace=mask is not None)
        sampler, spacing = s.resolved
        cond_all, uncond_all, scale = self.conditions(s)
        if concat is not None:  # the same extra channels for the conditional and the unconditional pass
            cond_all["concat"] = uncond_all["concat"] = concat
        schedule = self.diffusion.build_schedule()
        noise = noise or SeededNoise(s.seed)
        shape, n, b = self.latent_shape(s), s.n_samples, s.batch_size
        total = -(-n // b) * s.steps
        out, nfes = [], []
        options: dict[str, Any] = dict(s.sampler_options)  # the sampler's own keywords (checked by s.check)
        for start in range(0, n, b):
            part = slice(start, min(start + b, n))
            src = noise.chunk(start, part.stop - start)
            x_T = src.randn((part.stop - start, *shape)).to(self.device)
            extra = {} if concat is None else {"concat": concat[part]}
            eps_fn = self.eps_fn({k: v[part] for k, v in cond_all.items()},
                                 {k: v[part] for k, v in uncond_all.items()}, scale, schedule,
                                 None if regions is None else regions.part(part, extra), s.guidance_max_t)
            hook = None if callback is None else _progress(callback, (start // b) * s.steps, total)
            z, nfe = sample(eps_fn, x_T, schedule, sampler, s.steps, generator=src, callback=hook, spacing=spacing,
                            clip_x0=1.0 if isinstance(self.autoencoder, IdentityAutoencoder) else None,
                            return_nfe=True, init=None if init is None else init[part], strength=s.strength,
                            mask=mask, resample=s.resample, **options)
            out.append(z)
            nfes.append(nfe)
        return Latents(torch.cat(out), sum(nfes) / len(nfes))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """uint8 images (N, C, H, W) on the CPU from latents: x̂ = D(ẑ / s), the identity in pixel space."""
        return to_uint8_image(self.autoencoder.decode_latents(z)).cpu()


def _progress(callback: Callable[[Step], None], done: int, total: int) -> Callable[..., None]:
    """The sampler's per-step hook (i, t, z_t, x̂) as a Step counted over all chunks."""
    return lambda i, t, z_t, x0: callback(Step(min(done + i + 1, total), total, i, t, z_t, x0))


def _cast_inputs(net: Callable[..., Tensor], dtype: torch.dtype) -> Callable[..., Tensor]:
    """``net`` fed floating inputs in ``dtype``, answering in fp32."""
    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return lambda x, t, **kw: net(cast(x), t, **{k: cast(v) for k, v in kw.items()}).float()
