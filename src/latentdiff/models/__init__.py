"""Networks: the denoising UNet (more models live beside it)."""

from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
