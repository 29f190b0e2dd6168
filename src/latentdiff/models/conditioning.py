"""What the UNet is told besides z_t and t: nothing, a class label, or a prompt's context vectors.

One place turns labels or prompts into the UNet's keyword inputs (``class_labels=`` or ``context=``) and
gives the null condition that classifier-free guidance needs: the extra "no class" row of the label
embedding, or the context of the empty prompt "".
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ValueEnum
from latentdiff.models.unet import UNetConfig


class CondKind(ValueEnum):
    """What a UNet is told besides z_t and t; the value is what model folders and the web API write."""

    NONE = "none"
    CLASS = "class"
    TEXT = "text"


def conditioning_kind(unet: UNetConfig) -> CondKind:
    """TEXT when the UNet has cross-attention context, CLASS with a label embedding, else NONE."""
    if unet.context_dim is not None and unet.num_classes is not None:
        raise UserError("unet.context_dim and unet.num_classes are both set: choose text or class conditioning")
    if unet.context_dim is not None:
        return CondKind.TEXT
    return CondKind.CLASS if unet.num_classes is not None else CondKind.NONE


class Conditioner:
    """Builds the UNet's condition inputs; text contexts are cached per prompt (the encoder is frozen)."""

    def __init__(self, unet: UNetConfig, text_encoder: Optional[nn.Module] = None,
                 device: str | torch.device = "cpu", cache: bool = False) -> None:
        self.kind, self.num_classes = conditioning_kind(unet), unet.num_classes
        self.text_encoder, self.device = text_encoder, torch.device(device)
        self.cache: dict[str, Tensor] | None = {} if cache else None
        if self.kind is CondKind.TEXT:
            if text_encoder is None:
                raise UserError("this UNet reads text (unet.context_dim is set) but no text encoder was given")
            if text_encoder.width != unet.context_dim:
                raise UserError(f"text encoder width {text_encoder.width} does not match unet.context_dim "
                                f"{unet.context_dim}: set unet.context_dim={text_encoder.width}")

    def labels(self, labels: Tensor) -> dict[str, Tensor]:
        """{"class_labels": labels}; the value num_classes is the null class."""
        if self.kind is not CondKind.CLASS:
            raise UserError("this model is not class-conditional; drop the class label")
        return {"class_labels": labels.to(self.device, torch.long)}

    def prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"context": (B, L, D)} for the prompts ("" is the unconditional prompt)."""
        if self.kind is not CondKind.TEXT:
            raise UserError("this model does not take prompts (it was not trained on captions)")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise UserError(f"prompts must be strings, got {type(bad[0]).__name__}")
        # each distinct prompt is encoded once (one prompt for n samples: one encoder row, not n)
        store = self.cache if self.cache is not None else {}
        missing = [p for p in dict.fromkeys(prompts) if p not in store]
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            store.update(zip(chunk, self.text_encoder(chunk).cpu()))  # the persistent cache stays off the GPU
        return {"context": torch.stack([store[p] for p in prompts]).to(self.device)}

    def null(self, n: int) -> dict[str, Tensor]:
        """The unconditional inputs for n samples (empty dict for an unconditional model)."""
        if self.kind is CondKind.CLASS:
            return self.labels(torch.full((n,), self.num_classes))
        if self.kind is CondKind.TEXT:
            return self.prompts([""] * n)
        return {}

    def dropped(self, labels: Optional[Tensor], captions: Optional[Sequence[str]], drop: Tensor) -> dict[str, Tensor]:
        """Training inputs with the condition replaced by the null one where ``drop`` (bool (B,)) is set."""
        if self.kind is CondKind.CLASS:
            return self.labels(torch.where(drop, torch.full_like(labels, self.num_classes), labels))
        if self.kind is CondKind.TEXT:
            return self.prompts(["" if d else c for c, d in zip(captions, drop.tolist())])
        return {}
