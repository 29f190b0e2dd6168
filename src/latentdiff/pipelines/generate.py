"""Generation from a model folder: load → check the settings → task inputs → the core's sampler loop → images.

The loop itself is :class:`~latentdiff.models.sampling.LatentSampler` (shared with the trainer's grids and
the trajectory pictures); this module adds the model folder, image tasks (img2img, inpainting,
super-resolution) and PNG files. Memory is bounded by ``batch_size`` whatever ``n_samples`` is, and sample
i always starts from the noise of seed ``seed + i`` drawn on the CPU, so an image does not depend on the
chunking or the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

from latentdiff.data.images import make_grid, save_png, to_pil, upscale_nearest
from latentdiff.data.transforms import from_uint8_image
from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import SettingError, UserError
from latentdiff.models.autoencoder import Autoencoder, IdentityAutoencoder
from latentdiff.models.concat import ConcatKind, inpaint_concat, low_res_concat
from latentdiff.models.conditioning import Conditioner
from latentdiff.models.folder import Manifest, load_autoencoder, load_unet, read_manifest
from latentdiff.models.sampling import LatentSampler, Latents, ListedNoise, Noise, PerSampleNoise, SeededNoise, Step
from latentdiff.models.settings import NOT_AN_UPSCALER, SEED_MAX, TASK_HINTS, TASKS, SampleSettings, Task
from latentdiff.models.text_encoder import load_text_encoder
from latentdiff.models.unet import UNet
from latentdiff.pipelines.regions import Regions, region_inputs

__all__ = ["Pipeline", "Generated", "SampleSettings", "Task", "Step", "PerSampleNoise", "SeededNoise", "ListedNoise",
           "SEED_MAX"]
TASK_INPUTS = ("images", "mask", "low_res", "paste", "callback", "preview", "preview_every", "noise", "regions")


class Generated(NamedTuple):
    """Images as uint8 (N, C, H, W) on the CPU, and the network evaluations per image."""

    images: torch.Tensor
    nfe: float


@dataclass
class Pipeline:
    """A trained diffusion model (pixel or latent space) ready to sample; built by :meth:`load`."""

    unet: UNet
    autoencoder: Autoencoder | IdentityAutoencoder
    cond: Conditioner
    manifest: Manifest
    path: Path
    device: torch.device

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu") -> "Pipeline":
        """Load a model folder written by training (EMA weights)."""
        path = Path(path)
        manifest = read_manifest(path)
        if "unet" not in manifest.components:
            raise UserError(f"{path} holds an autoencoder without a UNet: nothing to sample "
                            "(train a diffusion model with latent.autoencoder pointing at it)")
        unet = load_unet(path, device)
        if "autoencoder" in manifest.components:
            autoencoder = load_autoencoder(path, device)  # kept in fp32: half-precision VAEs give black images
        else:
            autoencoder = IdentityAutoencoder(manifest.channels)
        text_encoder = None
        if "text_encoder" in manifest.components:
            text_encoder = load_text_encoder(path / "text_encoder", device)
        return cls(unet, autoencoder, Conditioner(unet.config, text_encoder, device), manifest, path,
                   torch.device(device))

    def configure(self, precision: str = "fp32", attention_slice: int = 0, vae_tile: int = 0) -> "Pipeline":
        """bf16 weights (UNet and text encoder; the VAE stays fp32), attention slicing, VAE tiles.

        Image sizes are not configured here: each call asks for its own (``SampleSettings.width/height``).
        """
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision must be fp32 or bf16, got {precision!r}")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.unet.to(dtype)
        if self.cond.text_encoder is not None:
            self.cond.text_encoder.to(dtype)
        self.unet.set_attention_slice(attention_slice or None)
        if isinstance(self.autoencoder, Autoencoder):
            self.autoencoder.tile = vae_tile
        return self

    # ---- what the model is -------------------------------------------------------------------------
    @property
    def core(self) -> LatentSampler:
        """The generation core over this model's networks (models/sampling.py)."""
        m = self.manifest
        return LatentSampler(self.unet, self.autoencoder, self.cond, m.diffusion, m.image_size, m.guidance,
                             m.conditioning.guidance_max_t if m.conditioning else None)

    @property
    def diffusion(self) -> DiffusionConfig:
        """The diffusion process the model was trained with."""
        return self.manifest.diffusion

    @property
    def concat_kind(self) -> Optional[ConcatKind]:
        """What the UNet reads beside z_t (models/concat.py): INPAINT, LOW_RES or None."""
        return self.manifest.concat

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks this model can do: concat models only their own."""
        return TASKS[self.concat_kind]

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's downsamplings."""
        return self.core.size_multiple

    @property
    def class_names(self) -> list[str]:
        """Names of the classes a class-conditional model can draw (empty otherwise)."""
        return list(self.manifest.class_names or []) if self.unet.config.num_classes else []

    def image_hw(self, settings: Optional[SampleSettings] = None) -> tuple[int, int]:
        """(height, width) of the images ``settings`` ask for (the model's own size without one)."""
        return self.core.image_hw(settings)

    def latent_shape(self, settings: Optional[SampleSettings] = None) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises at the size ``settings`` ask for."""
        return self.core.latent_shape(settings)

    # ---- generating ----------------------------------------------------------------------------------
    def check(self, settings: SampleSettings, task: Task = Task.TXT2IMG) -> SampleSettings:
        """Refuse settings this model cannot run for ``task``, with a SettingError naming the field."""
        kind = self.concat_kind
        if task not in self.tasks:
            hint = NOT_AN_UPSCALER if task is Task.UPSCALE else TASK_HINTS[kind]
            raise SettingError("task", f"this model does {', '.join(map(str, self.tasks))}, not {task}; {hint}")
        s = self.core.check(settings, replace=task is Task.INPAINT and kind is None)
        if kind is ConcatKind.LOW_RES and (s.width or s.height):
            raise SettingError("width" if s.width else "height",
                               "a super-resolution model's size is fixed by its low-resolution input")
        if kind is ConcatKind.INPAINT and s.resample != 1:
            raise SettingError("resample", "this is an inpainting model; resample applies only to inpainting by "
                                           "replacement with other models")
        return s

    def describe(self, settings: SampleSettings, task: Task = Task.TXT2IMG) -> dict[str, Any]:
        """The settings as run (sampler resolved, size filled in), for PNG metadata and job records."""
        return settings.metadata(task, self.image_hw(settings))

    def sample_latents(self, settings: SampleSettings, noise: Optional[Noise] = None,
                       callback: Optional[Callable[[Step], None]] = None, images: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None, low_res: Optional[torch.Tensor] = None,
                       regions: Optional[Regions] = None) -> Latents:
        """Check the settings for the task the inputs ask for, prepare the inputs, and draw the latents.

        ``callback(step)`` gets every sampler step (progress, t, z_t and x̂ of the current chunk). ``regions``:
        per sample (or one for all), (prompt, mask (H, W)) pairs whose masks add up to 1; each prompt guides
        only inside its mask (regional prompting: pipelines/regions.py; pipelines/layout.py makes them).
        """
        task = Task.of(images, mask, low_res)
        s = self.check(settings, task)
        init, keep, concat = self._task_inputs(s, images, mask, low_res)
        region_conds = None if regions is None else region_inputs(self, regions, s)
        return self.core.sample_latents(s, noise, callback, init=init, mask=keep, concat=concat, regions=region_conds)

    def run(self, settings: SampleSettings, images: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None, low_res: Optional[torch.Tensor] = None, paste: bool = True,
            callback: Optional[Callable[[int, int], None]] = None,
            preview: Optional[Callable[[int, torch.Tensor], None]] = None, preview_every: int = 1,
            noise: Optional[Noise] = None, regions: Optional[Regions] = None) -> Generated:
        """Draw ``settings.n_samples`` images (uint8 (N, C, H, W)) and the network evaluations per image.

        With ``images`` (uint8, one or n_samples) it is img2img at ``settings.strength``; with a ``mask``
        too (1 = keep, (H, W)) inpainting (``paste``: put the kept pixels back exactly). ``low_res`` (uint8,
        one or n_samples) is what a super-resolution model upscales. ``callback(done, total)`` follows
        every sampler step; ``preview(done, images)`` gets every ``preview_every`` steps the current
        chunk's predicted x0, decoded (what a web UI shows while it samples; one autoencoder decode each).
        ``regions``: regional prompts (see :meth:`sample_latents`).
        """
        if not isinstance(preview_every, int) or isinstance(preview_every, bool) or preview_every < 1:
            raise UserError(f"preview_every must be a positive integer, got {preview_every!r}")

        def on_step(step: Step) -> None:
            if callback is not None:
                callback(step.done, step.total)
            if preview is not None and (step.index + 1) % preview_every == 0:
                preview(step.done, self.core.decode(step.x0))  # x̂0 = D(x̂0 / s): where the sampler aims now

        hook = None if callback is None and preview is None else on_step
        latents = self.sample_latents(settings, noise, hook, images, mask, low_res, regions)
        b = settings.batch_size  # decoded in the same chunks: memory stays bounded by batch_size
        result = torch.cat([self.core.decode(latents.z[i:i + b]) for i in range(0, len(latents.z), b)])
        if mask is not None and paste:  # pixel-exact known region: latent models reproduce it only up to the VAE
            result = torch.where(mask.to(torch.bool).expand_as(result), images.expand_as(result), result)
        return Generated(result, latents.nfe)

    def generate(self, *args: Any, return_nfe: bool = False,
                 **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, float]:
        """:meth:`run` with the settings as arguments: SampleSettings' fields (positionally n_samples, batch_size,
        steps, sampler, seed), run's inputs by keyword, and further keywords as sampler options (``order``,
        ``rtol``, ...). Returns the images, with ``return_nfe`` also the network evaluations per image."""
        inputs = {k: kwargs.pop(k) for k in TASK_INPUTS if k in kwargs}
        out = self.run(SampleSettings.build(*args, **kwargs), **inputs)
        return tuple(out) if return_nfe else out.images

    def img2img(self, images: torch.Tensor, strength: float = Task.IMG2IMG.default_strength,
                **kwargs: Any) -> torch.Tensor:
        """SDEdit: noise uint8 ``images`` (N, C, H, W) to ``strength`` ∈ [0, 1] and denoise; 0 returns them."""
        return self.generate(**({"n_samples": len(images)} | kwargs), images=images, strength=strength)

    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, resample: int = 1, **kwargs: Any) -> torch.Tensor:
        """Redraw where ``mask`` (H, W) is 0, keep where it is 1; RePaint resampling with ``resample`` > 1."""
        return self.generate(**({"n_samples": len(images)} | kwargs), images=images, mask=mask, resample=resample)

    def upscale(self, low_res: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Super-resolution (SR3): images drawn given uint8 ``low_res`` (N or 1, C, l, l), l = model's low_res_size."""
        return self.generate(**({"n_samples": len(low_res)} | kwargs), low_res=low_res)

    # ---- task inputs -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _task_inputs(self, s: SampleSettings, images: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     low_res: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        """(init latents, keep-mask at latent resolution, concat channels), each None when the task has none."""
        n, kind = s.n_samples, self.concat_kind
        init, keep = self._image_latents(s, images, mask)
        if kind is ConcatKind.LOW_RES:
            return init, keep, self._low_res_input(low_res, n, self.latent_shape(s)[-1])
        if kind is ConcatKind.INPAINT:  # the UNet sees mask and masked image: no replacement (SD inpainting)
            x = from_uint8_image(images.expand(n, -1, -1, -1)).to(self.device)
            repaint = (1 - mask.float()).expand(n, 1, *mask.shape).to(self.device)  # SD's mask: 1 = repaint
            return (init if s.strength < 1 else None), None, inpaint_concat(self.autoencoder, x, repaint)
        return init, keep, None

    def _image_latents(self, s: SampleSettings, images: Optional[torch.Tensor],
                       mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Latents of the input images and the keep-mask at latent resolution (None, None without images)."""
        if images is None:
            if mask is not None:
                raise UserError("a mask needs the image it applies to")
            return None, None
        (h, w), ch, n = self.image_hw(s), self.manifest.channels, s.n_samples
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (ch, h, w):
            raise UserError(f"input images must be uint8 (N, {ch}, {h}, {w}) for this model, "
                            f"got {images.dtype} {tuple(images.shape)}")
        if len(images) not in (1, n):
            raise UserError(f"give one input image or n_samples={n}, got {len(images)}")
        x = from_uint8_image(images.expand(n, -1, -1, -1)).to(self.device)
        z = self.autoencoder.encode_latents(x)  # posterior mode, scaled: z = s · E(x)
        if mask is None:
            return z, None
        if tuple(mask.shape) != (h, w):
            raise UserError(f"mask must be ({h}, {w}) like the image, got {tuple(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise UserError(f"mask must hold only 0 (redraw) and 1 (keep), got values in "
                            f"[{float(mask.min()):g}, {float(mask.max()):g}]: threshold it (the CLI does at 50 %)")
        f = self.autoencoder.downsample_factor
        # a latent cell is kept only if every pixel it covers is kept (min-pool), so the seam is redrawn
        keep = -torch.nn.functional.max_pool2d(-mask.float()[None, None], f) if f > 1 else mask.float()[None, None]
        return z, keep.to(self.device)

    def _low_res_input(self, low_res: torch.Tensor, n: int, grid: int) -> torch.Tensor:
        """A super-resolution model's concat channels: the low-resolution images resized to the UNet's grid."""
        size, ch = self.manifest.low_res_size, self.manifest.channels
        if low_res.dtype != torch.uint8 or low_res.ndim != 4 or tuple(low_res.shape[1:]) != (ch, size, size):
            raise UserError(f"low-resolution images must be uint8 (N, {ch}, {size}, {size}) for this model "
                            f"(it upscales {size}x{size} to {self.manifest.image_size}), got "
                            f"{low_res.dtype} {tuple(low_res.shape)}")
        if len(low_res) not in (1, n):
            raise UserError(f"give one low-resolution image or n_samples={n}, got {len(low_res)}")
        return low_res_concat(from_uint8_image(low_res.expand(n, -1, -1, -1)).to(self.device), grid)

    def save(self, images: torch.Tensor, out_dir: Path | str, settings: dict[str, Any]) -> tuple[list[Path], Path]:
        """Write one PNG per image (settings and its own seed in the metadata) and a grid.png."""
        out_dir = Path(out_dir)
        meta = {k: v for k, v in settings.items() if k != "n_samples"} | {"model": str(self.path)}
        paths = []
        for i, img in enumerate(images):
            p = out_dir / f"{settings.get('seed', 0) + i:06d}.png"
            save_png(to_pil(img), p, meta | {"seed": settings.get("seed", 0) + i})
            paths.append(p)
        grid = out_dir / "grid.png"
        save_png(make_grid(upscale_nearest(images)), grid, meta)
        return paths, grid
