"""The autoencoder's training loss: LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022, Sec. 3.1, App. G).

Generator (autoencoder) side, per batch of B images:

    rec   = |x − x̂| (or (x − x̂)²)  +  perceptual_weight · LPIPS(x, x̂)        (LPIPS broadcast over pixels)
    L_nll = Σ_{b,c,h,w} [rec / e^logvar + logvar] / B                         (Laplace/Gaussian NLL, learned scale)
    L     = L_nll  +  kl_weight · Σ KL(q(z|x) ‖ N(0, I)) / B  +  λ · disc_factor · L_G,   L_G = −mean D(x̂)
    λ     = disc_weight · clamp(‖∇_last L_nll‖ / (‖∇_last L_G‖ + 1e-4), 0, 1e4)   (adaptive weight, Esser et al. 2021)

with ∇_last the gradient at the decoder's last layer; disc_factor is 0 before `disc_start` steps, so the GAN only
joins once reconstructions are reasonable. Discriminator side, the hinge loss
    L_D = ½ [mean relu(1 − D(x)) + mean relu(1 + D(x̂))].
Sums over pixels (not means) are CompVis' choice; they set the scale at which kl_weight ≈ 1e-6 is "slight".
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin
from ..models.autoencoder import DiagonalGaussian
from ..models.discriminator import NORMS, NLayerDiscriminator
from ..models.perceptual import KINDS, build_perceptual


@dataclass
class AutoencoderLossConfig(ConfigMixin):
    """Weights of the autoencoder loss; defaults follow SD's KL-f8 training except the smaller discriminator."""

    section: ClassVar[str] = "ae_loss"

    kl_weight: float = 1e-6  # slight KL pull towards N(0, I): keeps latents bounded without blurring (LDM: 1e-6)
    perceptual_weight: float = 1.0  # LPIPS term added to the pixel loss (LDM: 1.0); 0 skips the network
    perceptual: str = "random"  # "random" (offline, seeded features) or "vgg16" (needs perceptual_weights)
    perceptual_weights: str | None = None  # VGG16 weights file (torchvision layout, .safetensors or .pth)
    perceptual_lin_weights: str | None = None  # optional LPIPS calibration file (lin0..lin4.model.1.weight)
    rec_loss: str = "l1"  # "l1" (LDM) or "l2"
    disc_start: int = 5000  # step from which the GAN term is on; reconstructions must be decent first (SD: 50001)
    disc_weight: float = 0.5  # multiplies the adaptive weight λ (SD: 0.5)
    disc_factor: float = 1.0  # overall GAN factor once on (CompVis disc_factor)
    disc_layers: int = 2  # PatchGAN depth: 2 for 28-32 px images, 3 from 64 px (models/discriminator.py)
    disc_ndf: int = 32  # PatchGAN base width (pix2pix/SD: 64)
    disc_norm: str = "batch"  # "batch" (CompVis) or "group" (batch-size independent)
    logvar_init: float = 0.0  # initial learned log-variance of the NLL

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> UserError:
            return UserError(f"ae_loss.{key}: expected {expected}, got {getattr(self, key)!r}")

        for key in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise bad(key, "a finite number >= 0")
        if self.perceptual not in KINDS:
            raise bad("perceptual", " or ".join(repr(k) for k in KINDS))
        if self.rec_loss not in ("l1", "l2"):
            raise bad("rec_loss", "'l1' or 'l2'")
        if self.disc_norm not in NORMS:
            raise bad("disc_norm", " or ".join(repr(k) for k in NORMS))
        for key, low in (("disc_start", 0), ("disc_layers", 1), ("disc_ndf", 1)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise bad(key, f"an integer >= {low}")
        if not isinstance(self.logvar_init, (int, float)) or not math.isfinite(self.logvar_init):
            raise bad("logvar_init", "a finite number")




@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Let gradients flow *through* `module` to its input without building any for its own parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ [mean relu(1 − D(x)) + mean relu(1 + D(x̂))] (CompVis' hinge loss, with its ½)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Reconstruction + perceptual NLL with learned scale, slight KL, and an adaptively weighted PatchGAN.

    Optimise `autoencoder_parameters()` (the learned `logvar`) together with the autoencoder, and
    `discriminator_parameters()` with a second optimizer. (CompVis left `logvar` out of its optimizer, so SD's
    stayed at 0; include it to learn the scale, or keep it fixed by leaving it out.)
    """

    def __init__(self, config: AutoencoderLossConfig | None = None, in_channels: int = 1):
        super().__init__()
        self.config = cfg = config or AutoencoderLossConfig()
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)))
        self.perceptual = (build_perceptual(cfg.perceptual, cfg.perceptual_weights, cfg.perceptual_lin_weights)
                           if cfg.perceptual_weight > 0 else None)
        self.discriminator = NLayerDiscriminator(in_channels, cfg.disc_ndf, cfg.disc_layers, cfg.disc_norm)
        # data-parallel training averages the two last-layer gradients over processes (training/distributed.py)
        self.reduce_grads: Callable[[list[Tensor]], None] | None = None

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the autoencoder's optimizer (the log-variance)."""
        return [self.logvar]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the discriminator's optimizer."""
        return list(self.discriminator.parameters())

    def disc_factor(self, step: int) -> float:
        """The GAN factor at `step`: 0 before disc_start, then config.disc_factor."""
        return self.config.disc_factor if step >= self.config.disc_start else 0.0

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (a loop may skip the discriminator step while False)."""
        return self.disc_factor(step) > 0

    def adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """λ = disc_weight · clamp(‖∇_last L_nll‖ / (‖∇_last L_G‖ + 1e-4), 0, 1e4): balances the two gradients."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        if self.reduce_grads is not None:  # λ of the global batch, not of this process's share
            self.reduce_grads([nll_grad, g_grad])
        weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return weight * self.config.disc_weight

    def generator_loss(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian, step: int,
                       last_layer: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Autoencoder loss for images x and reconstructions x̂ (B, C, H, W) -> (loss, logs)."""
        cfg, b = self.config, x.shape[0]
        pixel = (x - recon).abs() if cfg.rec_loss == "l1" else (x - recon).square()
        rec = pixel
        p_loss = torch.zeros(b, device=x.device)
        if self.perceptual is not None:
            p_loss = self.perceptual(x, recon)
            rec = rec + cfg.perceptual_weight * p_loss.view(b, 1, 1, 1)  # per-sample LPIPS on every pixel, as LDM
        nll_loss = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl_loss = posterior.kl().sum() / b
        loss = nll_loss + cfg.kl_weight * kl_loss

        factor = self.disc_factor(step)
        g_loss, d_weight = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
        if factor > 0:
            with _frozen(self.discriminator):  # the generator step must not leave gradients in D
                g_loss = -self.discriminator(recon).mean()
            if torch.is_grad_enabled() and last_layer.requires_grad:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            # (under no_grad, e.g. validation, λ cannot be computed: 0, as CompVis)
            loss = loss + d_weight * factor * g_loss
        logs = {"loss": loss, "nll": nll_loss, "rec": pixel.mean(), "perceptual": p_loss.mean(), "kl": kl_loss,
                "logvar": self.logvar, "d_weight": d_weight, "g_loss": g_loss}
        return loss, {**{k: float(v.detach()) for k, v in logs.items()}, "disc_factor": factor}

    def discriminator_loss(self, x: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real x and (detached) reconstructions -> (loss, logs)."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        factor = self.disc_factor(step)
        loss = factor * hinge_d_loss(logits_real, logits_fake)  # 0 (with zero gradients) before disc_start
        return loss, {"d_loss": float(loss.detach()), "logits_real": float(logits_real.detach().mean()),
                      "logits_fake": float(logits_fake.detach().mean()), "disc_factor": factor}
