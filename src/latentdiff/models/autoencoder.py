"""The perceptual-compression stage of latent diffusion: a KL-regularised autoencoder x -> z -> x̂.

LDM (Rombach et al. 2022, Sec. 3.1) trains an encoder E and decoder D once, so that diffusion runs on the
f-times smaller latent z = E(x) instead of pixels; a slight KL pull towards N(0, I) ("KL-reg.") keeps the
latent space from drifting to arbitrary scales. DESIGN.md: z = s · E(x) with the latent scale s measured from
data (`measure_scale_factor`), diffusion on z, x̂ = D(ẑ / s).

Structure and parameter names (`encoder.down.{i}.block.{j}`, `mid.attn_1`, `decoder.up.{i}`, `quant_conv`, ...)
match CompVis `ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`, so the tensors of a
Stable Diffusion checkpoint's `first_stage_model.*` load by name once the prefix is stripped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin
from .vae_blocks import Decoder, Encoder


@dataclass
class AutoencoderConfig(ConfigMixin):
    """Hyper-parameters of `Autoencoder`; the defaults are a tiny f=2 model for 28x28 grey images on a CPU."""

    section: ClassVar[str] = "autoencoder"

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32  # CompVis `ch`: width of the first level; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per level; each level after the first halves H and W
    num_res_blocks: int = 1  # ResnetBlocks per encoder level (the decoder has one more, as in CompVis)
    z_channels: int = 4  # channels between encoder/decoder and the 1x1 (post_)quant_conv
    embed_dim: int = 4  # latent channels: what the diffusion model sees
    attn_in_mid: bool = True  # single-head self-attention in the middle block (SD: yes)
    dropout: float = 0.0
    double_z: bool = True  # encoder predicts mean and log-variance; False: a deterministic (plain) autoencoder
    scale_factor: float = 1.0  # s in z = s · (E(x) - shift): measured from data (measure_scale_factor), SD: 0.18215
    shift_factor: float = 0.0  # subtracted before scaling (SD 1/2: 0; SD3/Flux-style VAEs use one)
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups); a width they do not divide gets its
    #                        largest divisor below (tiny CPU models)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        for key in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "z_channels", "embed_dim",
                    "norm_groups"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"autoencoder.{key}: expected a positive integer, got {v!r}")
        if not self.channel_mult or not all(isinstance(m, int) and m > 0 for m in self.channel_mult):
            raise UserError(f"autoencoder.channel_mult: expected a non-empty list of positive integers, "
                            f"got {list(self.channel_mult)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"autoencoder.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor)
                and self.scale_factor > 0):
            raise UserError(f"autoencoder.scale_factor: expected a positive finite number, got {self.scale_factor!r}")
        if not (isinstance(self.shift_factor, (int, float)) and math.isfinite(self.shift_factor)):
            raise UserError(f"autoencoder.shift_factor: expected a finite number, got {self.shift_factor!r}")

    @classmethod
    def sd(cls) -> AutoencoderConfig:
        """Stable Diffusion v1/v2's VAE (KL-f8, 83,653,863 parameters): 512x512x3 <-> 64x64x4, s = 0.18215."""
        return cls(in_channels=3, out_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   z_channels=4, embed_dim=4, scale_factor=0.18215)

    @property
    def downsample_factor(self) -> int:
        """f = 2 ** (len(channel_mult) - 1): the latent is H/f x W/f."""
        return 2 ** (len(self.channel_mult) - 1)




class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2*C output channels [mean | logvar]."""

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic  # plain autoencoder: parameters hold the mean only, variance 0
        if deterministic:
            self.mean, self.logvar = parameters, torch.full_like(parameters, -30.0)
            self.std, self.var = torch.zeros_like(parameters), torch.zeros_like(parameters)
        else:
            self.mean, logvar = parameters.chunk(2, dim=1)
            self.logvar = logvar.clamp(-30.0, 20.0)  # as CompVis: exp() stays finite in fp32
            self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """z = mean + std · ε (reparameterised); ε given, or drawn on the generator's device (CPU by default)."""
        # Same seed, same latent on any device (DESIGN.md): the noise does not come from the GPU's generator.
        if noise is None:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> Tensor:
        """The most likely z: the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all but the batch dim -> (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).flatten(1).sum(1)

    def nll(self, x: Tensor) -> Tensor:
        """−log q(x) = ½ Σ (log 2π + log σ² + (x − μ)² / σ²), summed over all but the batch dim -> (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * (math.log(2 * math.pi) + self.logvar + (x - self.mean).square() / self.var).flatten(1).sum(1)


class Autoencoder(nn.Module):
    """KL-regularised autoencoder (CompVis `AutoencoderKL`): encode -> DiagonalGaussian, decode latent -> image."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = cfg = config or AutoencoderConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        n = 2 if cfg.double_z else 1
        self.quant_conv = nn.Conv2d(n * cfg.z_channels, n * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """f: the latent is H/f x W/f."""
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (embed_dim)."""
        return self.config.embed_dim

    @property
    def scale_factor(self) -> float:
        """s of z = s · (E(x) - shift)."""
        return self.config.scale_factor

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight, where the GAN loss's adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def _check_image(self, x: Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c:
            raise UserError(f"autoencoder input must be (B, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise UserError(f"autoencoder input height and width must be divisible by the downsampling factor {f}, "
                            f"got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) for images x (B, in_channels, H, W) in [-1, 1]; H and W divisible by f."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)), deterministic=not self.config.double_z)

    def decode(self, z: Tensor) -> Tensor:
        """Image x̂ (B, out_channels, f*h, f*w) from an unscaled latent z (B, embed_dim, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise UserError(f"autoencoder latent must be (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a sample (ε = ``noise`` if given) or the mode of the posterior -> (x̂, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    tile: int = 0  # > 0: encode_latents / decode_latents work in overlapping tiles of this latent side

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Diffusion latents z = s · (E(x) − shift) (DESIGN.md), from the posterior mode unless `sample`."""
        f = self.downsample_factor
        if self.tile and max(x.shape[2:]) > self.tile * f:
            self._check_image(x)  # tiles of the moments [mean | logvar], blended, then one posterior
            params = tiled(lambda t: self.quant_conv(self.encoder(t)), x, self.tile * f, 1 / f)
            posterior = DiagonalGaussian(params, deterministic=not self.config.double_z)
        else:
            posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Images x̂ = D(ẑ / s + shift): the inverse of `encode_latents`."""
        z = z / self.config.scale_factor + self.config.shift_factor
        if self.tile and max(z.shape[2:]) > self.tile:
            return tiled(self.decode, z, self.tile, self.downsample_factor)
        return self.decode(z)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    return starts if starts[-1] + tile >= size else starts + [size - tile]


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, scale: float, overlap: float = 0.25) -> Tensor:
    """``fn`` applied to overlapping ``tile`` x ``tile`` crops of x, blended into one output ``scale`` times larger.

    Each output pixel is the weighted mean of the tiles covering it, with weights ramping linearly
    across the overlap, so no seam is a hard edge. GroupNorm sees one tile's statistics at a time:
    the result differs a little from the untiled one (measured in tests/test_stable_diffusion.py).
    """
    h, w = x.shape[2:]
    th, tw = min(tile, h), min(tile, w)
    ov = max(1, round(tile * overlap))
    out = weight = None
    for top in _starts(h, th, max(th - ov, 1)):
        for left in _starts(w, tw, max(tw - ov, 1)):
            y = fn(x[:, :, top:top + th, left:left + tw])
            if out is None:
                out = y.new_zeros(*y.shape[:2], round(h * scale), round(w * scale))
                weight = y.new_zeros(1, 1, *out.shape[2:])
            oy, ox, (ny, nx) = round(top * scale), round(left * scale), y.shape[2:]
            ramp = max(1.0, ov * scale)
            ry = torch.minimum(torch.arange(ny, device=y.device) + 0.5, ny - torch.arange(ny, device=y.device) - 0.5)
            rx = torch.minimum(torch.arange(nx, device=y.device) + 0.5, nx - torch.arange(nx, device=y.device) - 0.5)
            wgt = ((ry / ramp).clamp(max=1)[:, None] * (rx / ramp).clamp(max=1)[None, :]).to(y.dtype)
            out[:, :, oy:oy + ny, ox:ox + nx] += y * wgt
            weight[:, :, oy:oy + ny, ox:ox + nx] += wgt
    return out / weight


class IdentityAutoencoder(nn.Module):
    """The f = 1, s = 1 'autoencoder' x -> x: pixel-space diffusion runs through the same latent code path."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.channels = channels
        self.scale_factor, self.shift_factor = 1.0, 0.0

    @property
    def downsample_factor(self) -> int:
        """Always 1."""
        return 1

    @property
    def latent_channels(self) -> int:
        """The image channels."""
        return self.channels

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise UserError(f"input must be (B, {self.channels}, H, W), got {tuple(x.shape)}")
        return x

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """The image itself."""
        return self._check(x)

    def decode_latents(self, z: Tensor) -> Tensor:
        """The latent itself."""
        return self._check(z)


def measure_scale_factor(latents: Tensor) -> float:
    """1 / std of the latents (LDM's scale_by_std, how SD's 0.18215 was measured), so s · z has unit variance."""
    std = latents.detach().double().std().item()
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"cannot measure the latent scale: the latents' standard deviation is {std} "
                        f"(shape {tuple(latents.shape)}); encode more than one distinct image")
    return 1.0 / std
