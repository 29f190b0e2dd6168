"""Pixel-level reconstruction metrics on N x C x H x W images: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from latentdiff.errors import UserError


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float64 N x C x H x W tensors of one shape, or a UserError naming the shapes."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dim() != 4 or a.shape != b.shape or a.shape[0] == 0:
        raise UserError(f"image metrics: expected two non-empty N x C x H x W batches of one shape, "
                        f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().cpu().double(), b.detach().cpu().double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """Mean over images of 10·log10(data_range² / MSE); inf when every pair is identical."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    # Per image, then averaged (as skimage and most papers report), not PSNR of the pooled MSE.
    per_image = [math.inf if m == 0 else 10 * math.log10(data_range**2 / m) for m in mse.tolist()]
    return float(sum(per_image) / len(per_image))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised size x size Gaussian weights (float64), SSIM's local window."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM: Gaussian-weighted local statistics over valid windows, averaged over pixels, channels, images."""
    x, y = _pair(a, b)
    n, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise UserError(f"ssim: images of {h}x{w} are smaller than the {win_size}x{win_size} window")
    win = gaussian_window(win_size, sigma).expand(c, 1, win_size, win_size)

    def blur(t: torch.Tensor) -> torch.Tensor:  # per-channel weighted mean over each valid window
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # Weighted (population) moments as in Wang et al.'s reference code; no n/(n-1) correction.
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())  # equal-sized maps: the overall mean is the mean of per-channel means
