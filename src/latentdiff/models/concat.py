"""Conditioning by concatenation: extra channels beside z_t at the UNet input, laid out as SD's checkpoints expect.

- ``"inpaint"`` (Stable Diffusion inpainting; 9 input channels for a 4-channel latent): the UNet reads
  cat([z_t, mask, z_masked]), where mask is 1 in the region to repaint, nearest-resized to the latent grid
  (as diffusers' StableDiffusionInpaintPipeline does), and z_masked = s · E(image · (mask < 0.5)), the
  scaled latent of the image with the hole set to 0 (mid grey in [-1, 1]).
- ``"low_res"`` (SR3, Saharia et al. 2021; SD's x4 upscaler): the UNet reads cat([z_t, y↑]), where y↑ is
  the low-resolution image resized bicubically to the grid the UNet works on.

The extra channels travel in the condition dict under ``"concat"``, so classifier-free guidance (which
batches cond and uncond) and chunking handle them like any other condition; :func:`with_concat` unpacks them.
A model folder says which kind it takes in its manifest: ``"concat": "inpaint" | "low_res"`` (absent: none).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.data.transforms import resize_bicubic
from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ValueEnum

class ConcatKind(ValueEnum):
    """What a concat model reads beside z_t; the value is what configs and model folders write."""

    INPAINT = "inpaint"
    LOW_RES = "low_res"

    @classmethod
    def of(cls, kind: "ConcatKind | str | None") -> "ConcatKind | None":
        """The kind a config or manifest string names (None: no concat conditioning)."""
        if kind is None or isinstance(kind, cls):
            return kind
        if kind not in CONCAT_KINDS:
            raise UserError(f"unknown concat kind {kind!r}; choose one of {', '.join(CONCAT_KINDS)}")
        return cls(kind)


CONCAT_KINDS = tuple(k.value for k in ConcatKind)


def concat_channels(kind: ConcatKind | str | None, latent_channels: int, image_channels: int) -> int:
    """How many channels the concatenation adds to the UNet input (0 without)."""
    extra = {None: 0, ConcatKind.INPAINT: 1 + latent_channels,  # mask + masked-image latent
             ConcatKind.LOW_RES: image_channels}
    return extra[ConcatKind.of(kind)]


def with_concat(model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The model as a function of (z_t, t, concat=..., **cond) that feeds it cat([z_t, concat])."""
    def forward(x: Tensor, t: Any, concat: Optional[Tensor] = None, **cond: Tensor) -> Tensor:
        return model(x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1), t, **cond)

    return forward


def latent_mask(repaint: Tensor, size: tuple[int, int]) -> Tensor:
    """The repaint mask (B, 1, H, W) at the latent grid: nearest resize, as diffusers' inpainting pipeline."""
    return F.interpolate(repaint.float(), size=size, mode="nearest")


@torch.no_grad()
def inpaint_concat(autoencoder: Any, images: Tensor, repaint: Tensor) -> Tensor:
    """cat([mask, s · E(images · (mask < 0.5))]) at the latent grid, for images in [-1, 1] and mask 1 = repaint."""
    masked = images * (repaint < 0.5)
    z = autoencoder.encode_latents(masked)
    return torch.cat([latent_mask(repaint.to(z.device), tuple(z.shape[-2:])), z], dim=1)


def low_res_concat(low_res: Tensor, size: int) -> Tensor:
    """The low-resolution images (in [-1, 1]) resized bicubically to the UNet's grid (size x size)."""
    return resize_bicubic(low_res, size)


def widen_input(state: dict[str, Tensor], in_channels: int, source: str) -> dict[str, Tensor]:
    """A UNet state dict whose first convolution reads ``in_channels``: added input channels get zero weights,
    so the widened UNet computes what the original did until training uses the concatenated inputs."""
    key = "input_blocks.0.0.weight"
    if key not in state:
        raise UserError(f"{source}: not a latentdiff UNet ({key} not found)")
    w = state[key]
    if w.shape[1] > in_channels:
        raise UserError(f"{source}: its UNet reads {w.shape[1]} input channels, "
                        f"more than unet.in_channels={in_channels}")
    extra = w.new_zeros(w.shape[0], in_channels - w.shape[1], *w.shape[2:])
    return state | {key: torch.cat([w, extra], dim=1)}


def network_differences(saved: dict[str, Any], cfg: Any) -> list[str]:
    """The unet.* overrides that would make ``cfg`` the network a saved UNet config.json describes (in_channels,
    which a fine-tune may widen, and dropout, which holds no weights, aside)."""
    mine = cfg.to_dict()
    return [f"unet.{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in saved.items()
            if k in mine and k not in ("in_channels", "dropout") and mine[k] != v]
