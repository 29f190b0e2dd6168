"""A small CNN classifier for small grey or RGB images: the "domain feature network" of FID-style metrics.

Inception features describe ImageNet photos; on 28x28 digits or clothes a classifier trained on the
domain itself gives more telling features (as in the MNIST "FID" of many papers). ``features`` is the
penultimate layer (after its ReLU), ``forward`` the class logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin


@dataclass
class ClassifierConfig(ConfigMixin):
    """Hyper-parameters of `Classifier`; defaults fit 28x28 grey images with 10 classes (147k parameters)."""

    section: ClassVar[str] = "classifier"

    in_channels: int = 1  # 1 grey or 3 RGB
    image_size: int = 28  # square side the network was trained at (inputs are resized to it); >= 16
    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32, 64)  # width per stage; each stage is two 3x3 convs then a 2x2 max pool
    pool_size: int = 3  # the last map (3x3 at 28 px) is average-pooled to pool_size² cells whatever the input size
    feature_dim: int = 128  # width D of `features`
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.in_channels not in (1, 3):
            raise UserError(f"classifier in_channels: expected 1 or 3, got {self.in_channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise UserError(f"classifier image_size: expected an integer >= 16, got {self.image_size!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise UserError(f"classifier: {len(self.class_names)} class names for {self.num_classes} classes")




class Classifier(nn.Module):
    """conv-BN-ReLU x2 + max pool per stage, adaptive average pool, Linear-ReLU (features), Linear (logits)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c in cfg.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool_size))
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * cfg.pool_size**2, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) floats in [-1, 1] → (N, feature_dim) penultimate activations."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) floats in [-1, 1] → (N, num_classes) logits."""
        return self.head(self.features(x))


def prepare_images(images: Tensor, cfg: ClassifierConfig) -> Tensor:
    """uint8 (N, C, H, W) → floats in [-1, 1] with the classifier's channels and size."""
    x = from_uint8_image(images)
    if x.shape[1] != cfg.in_channels:
        # Grey from RGB by the ITU-R 601 luma weights (PIL's "L"); RGB from grey by repetition.
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True) \
            if cfg.in_channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (cfg.image_size, cfg.image_size):
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x
