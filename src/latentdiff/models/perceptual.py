"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", Eq. 1) with a pluggable feature network.

    d(x0, x1) = Σ_l  mean_{h,w}  ‖ w_l ⊙ (ŷ0_l − ŷ1_l) ‖²,   ŷ_l = features of layer l, unit-normalised over channels

LDM's autoencoder loss adds this to the pixel L1 so reconstructions keep edges and texture (Rombach et al. 2022,
Sec. 3.1 and App. G). Two feature networks:

- ``vgg16``: the torchvision VGG16 layout (``features.*`` keys), tapped at relu1_2, relu2_2, relu3_3, relu4_3 and
  relu5_3 as LPIPS does. It needs a user-supplied weights file (nothing is downloaded) and, optionally, the
  official LPIPS per-channel weights (``lin0..lin4.model.1.weight``); without them every channel weighs 1.
- ``random`` (the default, offline): a fixed VGG-style conv net with seeded Gaussian (He) weights, tapped
  after each of 5 scales. Why a random network is a fair stand-in: a deep conv net with random filters still
  compares the *local patch statistics* of two images at several scales (Amir & Weiss 2021 prove that the
  perceptual distance of a wide random CNN is an MMD between the distributions of small patches, and find it
  competitive with trained networks as a training loss); random multi-scale conv features also suffice for
  texture synthesis (He et al. 2016; Ustyuzhaninov et al. 2017). Zhang et al. evaluate a random (Gaussian-
  initialised) network too (Sec. 4.1, Fig. 4): as a *metric of human judgements* it is their weakest deep
  feature, close to classic metrics and well below trained networks. So: use it as a texture/structure-aware
  training signal that needs no download, not as a number to compare with published LPIPS scores. Its limits:
  no semantics, uncalibrated channel weights, and values on a different scale from LPIPS-VGG.
See docs/perceptual.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..formats.checkpoint import load_tensors, load_weights_only

KINDS = ("random", "vgg16")
# torchvision VGG16 `features`: conv widths, "M" = 2x2 max-pool. Index i of the Sequential = torchvision's.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS' ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
VGG_SHIFT = (-0.030, -0.088, -0.188)
VGG_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16's convolutional part with torchvision's `features.{i}` names; returns the 5 LPIPS taps."""

    shift: Tensor  # buffers, registered in __init__
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.channels = (64, 128, 256, 512, 512)  # widths at the 5 taps
        self.register_buffer("shift", torch.tensor(VGG_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(VGG_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [-1, 1], H, W >= 16 -> features at relu1_2 ... relu5_3."""
        if min(x.shape[2:]) < 16:
            raise UserError(f"vgg16 perceptual loss needs images of at least 16x16 (4 poolings), got {tuple(x.shape)}")
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
                if len(out) == len(VGG16_TAPS):
                    break
        return out


class RandomFeatures(nn.Module):
    """Fixed random VGG-style net: per scale two conv3x3+ReLU, 2x average pooling between scales; 5 taps."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 128), seed: int = 0):
        super().__init__()
        self.channels = tuple(widths)
        gen = torch.Generator().manual_seed(seed)  # CPU generator: identical weights on every machine and build
        self.stages = nn.ModuleList()
        c = 3
        for w in widths:
            convs = [nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)]
            for conv in convs:
                # He-normal weights keep activations at the same scale through the ReLUs; no training, ever.
                fan_in = conv.in_channels * 9
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                    nn.init.zeros_(conv.get_parameter("bias"))
            self.stages.append(nn.ModuleList(convs))
            c = w

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> one feature map per scale (any H, W: pooling rounds up)."""
        out, h = [], x
        for i, stage in enumerate(self.stages):
            conv1, conv2 = stage.children()
            if i:
                h = F.avg_pool2d(h, 2, ceil_mode=True)
            h = F.relu(conv2(F.relu(conv1(h))))
            out.append(h)
        return out


class LPIPS(nn.Module):
    """Frozen perceptual distance d(x0, x1) -> (B,): unit-normalised features, weighted squared difference."""

    def __init__(self, net: VGG16Features | RandomFeatures):
        super().__init__()
        self.net = net
        # Non-negative per-channel weights w_l (1x1 conv, no bias); all ones = LPIPS' uncalibrated variant,
        # i.e. the channel-summed squared distance of unit vectors, each layer counting the same.
        lins = [nn.Conv2d(c, 1, 1, bias=False) for c in net.channels]
        for lin in lins:
            nn.init.ones_(lin.weight)
        self.lins = nn.ModuleList(lins)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode: the metric is fixed (a parent's .train() must not change it)."""
        return super().train(False)

    def load_lin_weights(self, path: str | Path) -> None:
        """Load LPIPS' calibrated channel weights (`lin{i}.model.1.weight`, shape (1, C_i, 1, 1), non-negative)."""
        tensors = read_weights(path)
        for i, weight in enumerate(self.lins.parameters()):  # one (1, C_i, 1, 1) weight per lin, no bias
            key = f"lin{i}.model.1.weight"
            _check_key(path, tensors, key, weight.shape, "LPIPS lin-layer")
            if (tensors[key] < 0).any():
                raise UserError(f"{path}: {key} has negative entries; LPIPS channel weights must be >= 0")
            with torch.no_grad():
                weight.copy_(tensors[key])

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Distance per sample (B,) between images in [-1, 1] with 1 (grey, repeated) or 3 channels."""
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] not in (1, 3):
            raise UserError(f"perceptual loss needs two (B, 1 or 3, H, W) images of one shape, "
                            f"got {tuple(x0.shape)} and {tuple(x1.shape)}")
        b = x0.shape[0]
        x = torch.cat([x0, x1]).expand(-1, 3, -1, -1)  # one pass for both images; grey -> 3 equal channels
        x = x.to(next(self.lins.parameters()).dtype)
        total = x0.new_zeros(b, dtype=x.dtype)
        for feat, lin in zip(self.net(x), self.lins):
            f = F.normalize(feat, dim=1, eps=1e-10)  # unit length over channels at each pixel (Zhang et al. Eq. 1)
            total = total + lin((f[:b] - f[b:]).square()).mean(dim=(1, 2, 3))
        return total


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file, or from a .pth/.pt/.bin/.ckpt read with torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise UserError(f"{path}: expected a .safetensors file (or a .pth/.pt/.bin/.ckpt state dict)")
    obj = load_weights_only(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict (name -> tensor), got a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _check_key(path: str | Path, tensors: dict[str, Tensor], key: str, shape: torch.Size, what: str) -> None:
    if key not in tensors:
        raise UserError(f"{path}: missing key {key} (expected {what} weights)")
    if tensors[key].shape != shape:
        raise UserError(f"{path}: key {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} ({what})")


def load_vgg16(net: VGG16Features, path: str | Path) -> None:
    """Copy a torchvision-layout VGG16 state dict's `features.*` tensors into `net` (classifier keys ignored)."""
    tensors = read_weights(path)
    expected = net.state_dict()
    for key, value in expected.items():
        _check_key(path, tensors, key, value.shape, "torchvision VGG16 layout")
    net.load_state_dict({k: tensors[k] for k in expected})


def build_perceptual(kind: str = "random", weights: str | None = None, lin_weights: str | None = None) -> LPIPS:
    """A frozen LPIPS: `random` (offline default, seeded) or `vgg16` (needs `weights`); optional calibrated lins."""
    if kind == "random":
        if weights is not None:
            raise UserError(f"perceptual 'random' is built from a fixed seed and takes no weights file (got {weights})")
        net: VGG16Features | RandomFeatures = RandomFeatures()
    elif kind == "vgg16":
        if weights is None:
            raise UserError("perceptual 'vgg16' needs a weights file (torchvision VGG16 state dict, .safetensors "
                            "or .pth); nothing is downloaded. Use perceptual 'random' to run offline")
        net = VGG16Features()
        load_vgg16(net, weights)
    else:
        raise UserError(f"unknown perceptual network {kind!r} (known: {', '.join(KINDS)})")
    lpips = LPIPS(net)
    if lin_weights is not None:
        lpips.load_lin_weights(lin_weights)
    return lpips
