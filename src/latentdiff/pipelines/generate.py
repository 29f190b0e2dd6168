"""Generation from a model folder: load → prepare noise per seed → sampler loop in chunks → images.

Memory is bounded by ``batch_size`` whatever ``n_samples`` is. Sample i always starts from the noise
of seed ``seed + i`` drawn on the CPU, so an image does not depend on the chunking or the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.formats.dataclass_io import build_dataclass
from latentdiff.data.images import make_grid, save_png, to_pil, upscale_nearest
from latentdiff.data.transforms import from_uint8_image, to_uint8_image
from latentdiff.diffusion import Schedule, as_eps_fn, classifier_free_guidance, sample
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import Autoencoder, IdentityAutoencoder
from latentdiff.models.concat import CONCAT_KINDS, inpaint_concat, low_res_concat, with_concat
from latentdiff.models.conditioning import Conditioner
from latentdiff.models.folder import load_autoencoder, load_unet, read_manifest
from latentdiff.models.text_encoder import load_text_encoder
from latentdiff.models.unet import UNet

MAX_SEED = 2**63 - 1


def _per_sample(prompts: str | list[str], n: int, name: str) -> list[str]:
    """One prompt for all samples, or a list with one per sample."""
    if isinstance(prompts, str):
        return [prompts] * n
    if len(prompts) not in (1, n):
        raise UserError(f"give one {name} or one per sample (n_samples={n}), got {len(prompts)}")
    return list(prompts) * (n // len(prompts))


def _cast_inputs(net: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``net`` fed floating inputs in ``dtype``, answering in fp32."""
    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return lambda x, t, **kw: net(cast(x), t, **{k: cast(v) for k, v in kw.items()}).float()


class PerSampleNoise:
    """A noise source that draws each sample's noise from its own CPU generator (seed + i)."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(len(seeds), *shape[1:]) standard normal noise, one generator per row."""
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.generators])


@dataclass
class Pipeline:
    """A trained diffusion model (pixel or latent space) ready to sample; built by :meth:`load`."""

    unet: UNet
    autoencoder: Autoencoder | IdentityAutoencoder
    diffusion: DiffusionConfig
    manifest: dict[str, Any]
    path: Path
    device: torch.device
    cond: Conditioner
    hw: Optional[tuple[int, int]] = None  # (height, width) of non-square outputs; None: the model's square size

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu") -> "Pipeline":
        """Load a model folder written by training (EMA weights)."""
        path = Path(path)
        manifest = read_manifest(path)
        if "unet" not in manifest["components"]:
            raise UserError(f"{path} holds an autoencoder without a UNet: nothing to sample "
                            "(train a diffusion model with latent.autoencoder pointing at it)")
        unet = load_unet(path, device)
        if "autoencoder" in manifest["components"]:
            autoencoder = load_autoencoder(path, device)  # kept in fp32: half-precision VAEs give black images
        else:
            autoencoder = IdentityAutoencoder(manifest["channels"])
        diffusion = build_dataclass(DiffusionConfig, manifest["diffusion"], f"{path}/model_index.json:diffusion")
        text_encoder = None
        if "text_encoder" in manifest["components"]:
            text_encoder = load_text_encoder(path / "text_encoder", device)
        cond = Conditioner(unet.config, text_encoder, device)
        return cls(unet, autoencoder, diffusion, manifest, path, torch.device(device), cond)

    def configure(self, size: int | tuple[int, int] | None = None, precision: str = "fp32", attention_slice: int = 0,
                  vae_tile: int = 0) -> "Pipeline":
        """Image size (a side: the model's default square; or (height, width)), bf16 weights (UNet and text
        encoder; the VAE stays fp32), attention slicing, VAE tiles."""
        if size is not None:
            f, sides = self.size_multiple, (size, size) if isinstance(size, int) else tuple(size)
            if any(side % f or side < f for side in sides):
                raise UserError(f"image size {sides[1]}x{sides[0]} (width x height): both sides must be multiples "
                                f"of {f} for this model (autoencoder and UNet levels)")
            if self.concat_kind == "low_res":
                raise UserError("a super-resolution model's size is fixed by its low-resolution input")
            if isinstance(size, int):
                self.manifest["image_size"], self.hw = size, None
            else:
                self.hw = sides
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

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's downsamplings."""
        return self.autoencoder.downsample_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the images :meth:`generate` draws."""
        return self.hw or (self.manifest["image_size"],) * 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises: the image itself in pixel space."""
        f, (h, w) = self.autoencoder.downsample_factor, self.image_hw
        return (self.autoencoder.latent_channels, h // f, w // f)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes a class-conditional model can draw (empty otherwise)."""
        return list(self.manifest.get("class_names") or []) if self.unet.config.num_classes else []

    def generate(self, n_samples: int = 16, batch_size: int = 16, steps: int = 50, sampler: str = "ddim",
                 seed: int = 0, class_label: Optional[int] = None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, guidance: Optional[float] = None,
                 eta: Optional[float] = None,
                 callback: Optional[Callable[[int, int], None]] = None, spacing: str = "trailing",
                 return_nfe: bool = False, images: Optional[torch.Tensor] = None, strength: float = 1.0,
                 mask: Optional[torch.Tensor] = None, resample: int = 1, low_res: Optional[torch.Tensor] = None,
                 paste: bool = True, preview: Optional[Callable[[int, torch.Tensor], None]] = None,
                 preview_every: int = 1, **sampler_options: float) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Draw ``n_samples`` images as a uint8 (N, C, H, W) tensor, ``batch_size`` at a time.

        Conditional models take ``class_label`` or ``prompt`` (one, or one per sample), with classifier-free
        ``guidance`` (default: the scale the model was trained to preview with; 1 = no guidance) away
        from ``negative_prompt`` (default: the empty prompt). ``callback(done_steps, total_steps)`` is called after every sampler step (the adaptive sampler's
        count is capped at the total). ``eta`` and ``sampler_options`` go to the sampler, which refuses
        options it does not take. With ``return_nfe`` also the network evaluations per sample (the mean
        over chunks: only the adaptive sampler's count varies). With ``images`` (uint8, one or
        ``n_samples``) it is img2img at ``strength``; with a ``mask`` too (1 = keep, (H, W)) inpainting:
        see :meth:`img2img` and :meth:`inpaint` (``paste``: put the kept pixels back exactly). ``low_res``
        (uint8, one or ``n_samples``) is what a super-resolution model upscales: see :meth:`upscale`.
        ``preview(done_steps, images)`` gets every ``preview_every`` steps the current chunk's predicted x0,
        decoded to uint8 (what a web UI shows while it samples; each costs one autoencoder decode).
        """
        for name, v in (("n_samples", n_samples), ("batch_size", batch_size), ("steps", steps),
                        ("preview_every", preview_every)):
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= seed <= MAX_SEED - n_samples:
            raise UserError(f"seed must be in [0, {MAX_SEED - n_samples}], got {seed}")
        cond_all, uncond_all, guidance = self.conditions(n_samples, class_label, prompt, negative_prompt, guidance)
        schedule = self.diffusion.build_schedule()
        pixel_space = isinstance(self.autoencoder, IdentityAutoencoder)
        options = dict(sampler_options) | ({"eta": eta} if eta is not None else {})
        init_all, keep = self._task_inputs(images, mask, n_samples)
        concat = self._concat_input(images, mask, low_res, n_samples)
        if concat is not None:  # the same extra channels for the conditional and the unconditional pass
            cond_all["concat"] = uncond_all["concat"] = concat
            if self.concat_kind == "inpaint":  # the UNet sees mask and masked image: no replacement (SD inpainting)
                if resample != 1:
                    raise UserError(f"{self.path} is an inpainting model; resample applies only to inpainting "
                                    "by replacement with other models")
                keep, init_all = None, (init_all if strength < 1 else None)
        out, nfes, total = [], [], -(-n_samples // batch_size) * steps
        for start in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - start)
            noise_src = PerSampleNoise(list(range(seed + start, seed + start + n)))
            x_T = noise_src.randn((n, *self.latent_shape)).to(self.device)
            part = slice(start, start + n)
            eps_fn = self.eps_fn({k: v[part] for k, v in cond_all.items()},
                                 {k: v[part] for k, v in uncond_all.items()}, guidance, schedule)
            done = (start // batch_size) * steps

            def step_cb(i: int, t: Any, x: torch.Tensor, x0: torch.Tensor, done: int = done) -> None:
                if callback is not None:
                    callback(min(done + i + 1, total), total)
                if preview is not None and (i + 1) % preview_every == 0:
                    with torch.no_grad():  # x̂0 = D(x̂0 / s): the picture the sampler currently aims at
                        preview(min(done + i + 1, total), to_uint8_image(self.autoencoder.decode_latents(x0)).cpu())

            init = None if init_all is None else init_all[start:start + n]
            z, nfe = sample(eps_fn, x_T, schedule, sampler, steps, generator=noise_src,
                            callback=None if callback is None and preview is None else step_cb,
                            spacing=spacing, clip_x0=1.0 if pixel_space else None, return_nfe=True, init=init,
                            strength=strength, mask=keep, resample=resample, **options)
            nfes.append(nfe)
            with torch.no_grad():
                x = self.autoencoder.decode_latents(z)  # x̂ = D(ẑ / s)
            out.append(to_uint8_image(x).cpu())
        result = torch.cat(out)
        if mask is not None and paste:  # pixel-exact known region: latent models only reproduce it up to the autoencoder
            keep_px = mask.to(torch.bool).expand_as(result)
            result = torch.where(keep_px, images.expand_as(result), result)
        return (result, sum(nfes) / len(nfes)) if return_nfe else result

    def img2img(self, images: torch.Tensor, strength: float = 0.6, **kwargs: Any) -> torch.Tensor:
        """SDEdit: noise uint8 ``images`` (N, C, H, W) to ``strength`` ∈ [0, 1] and denoise; 0 returns them."""
        return self.generate(**({"n_samples": len(images)} | kwargs), images=images, strength=strength)

    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, resample: int = 1, **kwargs: Any) -> torch.Tensor:
        """Redraw where ``mask`` (H, W) is 0, keep where it is 1; RePaint resampling with ``resample`` > 1."""
        return self.generate(**({"n_samples": len(images)} | kwargs), images=images, mask=mask, resample=resample)

    def upscale(self, low_res: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Super-resolution (SR3): images drawn given uint8 ``low_res`` (N or 1, C, l, l), l = the model's low_res_size."""
        return self.generate(**({"n_samples": len(low_res)} | kwargs), low_res=low_res)

    @property
    def concat_kind(self) -> Optional[str]:
        """What the UNet reads beside z_t (models/concat.py): "inpaint", "low_res" or None."""
        return self.manifest.get("concat")

    @torch.no_grad()
    def _concat_input(self, images: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      low_res: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        """The channels a concat model reads beside z_t for n samples (None for other models)."""
        kind = self.concat_kind
        if kind != "low_res" and low_res is not None:
            raise UserError(f"{self.path} is not a super-resolution model: it takes no low-resolution image")
        if kind is None:
            return None
        if kind == "inpaint":
            if images is None or mask is None:
                raise UserError(f"{self.path} is an inpainting model: give an image and a mask "
                                "(Pipeline.inpaint, latentdiff inpaint)")
            x = from_uint8_image(images.expand(n, -1, -1, -1)).to(self.device)
            repaint = (1 - mask.float()).expand(n, 1, *mask.shape).to(self.device)  # SD's mask: 1 = repaint
            return inpaint_concat(self.autoencoder, x, repaint)
        if kind == "low_res":
            if low_res is None:
                raise UserError(f"{self.path} is a super-resolution model: give the low-resolution image "
                                "(Pipeline.upscale, latentdiff upscale)")
            size, ch = self.manifest["low_res_size"], self.manifest["channels"]
            if low_res.dtype != torch.uint8 or low_res.ndim != 4 or tuple(low_res.shape[1:]) != (ch, size, size):
                raise UserError(f"low-resolution images must be uint8 (N, {ch}, {size}, {size}) for this model "
                                f"(it upscales {size}x{size} to {self.manifest['image_size']}), got "
                                f"{low_res.dtype} {tuple(low_res.shape)}")
            if len(low_res) not in (1, n):
                raise UserError(f"give one low-resolution image or n_samples={n}, got {len(low_res)}")
            y = from_uint8_image(low_res.expand(n, -1, -1, -1)).to(self.device)
            return low_res_concat(y, self.latent_shape[-1])
        raise UserError(f"{self.path}/model_index.json: unknown concat kind {kind!r}; "
                        f"this version knows {', '.join(CONCAT_KINDS)}")

    @torch.no_grad()
    def _task_inputs(self, images: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Latents of the input images and the keep-mask at latent resolution (None, None without images)."""
        if images is None:
            if mask is not None:
                raise UserError("a mask needs the image it applies to")
            return None, None
        (h, w), ch = self.image_hw, self.manifest["channels"]
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
    def eps_fn(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], guidance: float,
               schedule: Schedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The UNet as the ε-predictor the samplers take, with classifier-free guidance."""
        net = with_concat(self.unet)
        dtype = next(self.unet.parameters()).dtype
        if dtype != torch.float32:  # bf16 weights: the sampler's state stays fp32, only the network runs narrow
            net = _cast_inputs(net, dtype)
        max_t = self.manifest.get("conditioning", {}).get("guidance_max_t")  # guided steps: t <= max_t
        model_fn = classifier_free_guidance(net, cond, uncond, guidance, max_t)
        return as_eps_fn(model_fn, schedule, self.diffusion.prediction)

    @torch.no_grad()
    def conditions(self, n: int, class_label: Optional[int], prompt: str | list[str] | None,
                    negative_prompt: str | list[str] | None,
                    guidance: Optional[float]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
        """The UNet's conditional and unconditional inputs for all n samples, and the guidance scale."""
        kind = self.cond.kind
        if class_label is not None and kind != "class":
            raise UserError(f"{self.path} is not class-conditional; drop --class-label")
        if (prompt is not None or negative_prompt is not None) and kind != "text":
            raise UserError(f"{self.path} was not trained on captions: it takes no prompt")
        if guidance is not None and not 0 <= guidance < float("inf"):
            raise UserError(f"guidance must be a finite number >= 0, got {guidance}")
        if kind == "none" or (kind == "class" and class_label is None):
            return self.cond.null(n), self.cond.null(n), 1.0  # no condition: plain (unconditional) samples
        if guidance is None:
            guidance = float(self.manifest.get("conditioning", {}).get("guidance", 1.0))
        if kind == "class":
            classes = self.unet.config.num_classes
            if not 0 <= class_label < classes:
                raise UserError(f"class label {class_label} out of range 0..{classes - 1} "
                                f"({', '.join(self.class_names)})")
            return self.cond.labels(torch.full((n,), class_label)), self.cond.null(n), guidance
        return (self.cond.prompts(_per_sample(prompt or "", n, "prompt")),
                self.cond.prompts(_per_sample(negative_prompt or "", n, "negative_prompt")), guidance)

    def save(self, images: torch.Tensor, out_dir: Path | str, settings: dict[str, Any]) -> tuple[list[Path], Path]:
        """Write one PNG per image (settings and its own seed in the metadata) and a grid.png."""
        out_dir = Path(out_dir)
        paths = []
        for i, img in enumerate(images):
            p = out_dir / f"{settings.get('seed', 0) + i:06d}.png"
            save_png(to_pil(img), p, settings | {"seed": settings.get("seed", 0) + i, "model": str(self.path)})
            paths.append(p)
        grid = out_dir / "grid.png"
        save_png(make_grid(upscale_nearest(images)), grid, settings | {"model": str(self.path)})
        return paths, grid
