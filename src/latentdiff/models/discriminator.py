"""PatchGAN discriminator of pix2pix (Isola et al. 2017), as LDM's autoencoder loss uses it (CompVis/taming).

It outputs a grid of logits, one per overlapping image patch, so it judges local texture and sharpness — what
an L1 + perceptual loss leaves blurry — rather than global layout. Each stride-2 layer doubles the patch size:

=========  ============  ==========================  ==========================================
n_layers   patch (px)    smallest input (3 · 2^n)    fits
=========  ============  ==========================  ==========================================
1          16 x 16       6                           tiny images (< 24 px)
2          34 x 34       12                          28-32 px (MNIST, CIFAR): 5x5 / 6x6 logits
3          70 x 70       24                          >= 64 px; SD's 256 px training crops
4          142 x 142     48                          >= 256 px
=========  ============  ==========================  ==========================================

Output size for an input of side H: floor(H / 2^n) − 2. With n_layers=3 a 28 px image gives one 1x1 logit
(the patch covers the whole image): it still works, as a global discriminator.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UserError
from ..nn.resblock import norm_groups

NORMS = ("batch", "group")


def min_input_size(n_layers: int) -> int:
    """Smallest square input side for which `n_layers` gives at least one logit (3 · 2^n_layers)."""
    return 3 * 2 ** n_layers


def weights_init(m: nn.Module) -> None:
    """pix2pix / DCGAN init: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv4/2-LReLU, (n_layers−1) x conv4/2-norm-LReLU, conv4/1-norm-LReLU, conv4/1 -> patch logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"discriminator norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if n_layers < 1:
            raise UserError(f"discriminator n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers

        def make_norm(c: int) -> nn.Module:
            # BatchNorm as CompVis; GroupNorm does not depend on the batch (small or per-GPU batches, no SyncBN).
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(norm_groups(c), c)

        bias = norm != "batch"  # a conv bias right before BatchNorm is cancelled by its mean subtraction
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                       make_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> patch logits (B, 1, H/2^n − 2, W/2^n − 2)."""
        if x.ndim != 4 or min(x.shape[2:]) < min_input_size(self.n_layers):
            raise UserError(f"discriminator input {tuple(x.shape)} is too small for n_layers={self.n_layers}: "
                            f"height and width must be >= {min_input_size(self.n_layers)}; use fewer layers")
        return self.main(x)
