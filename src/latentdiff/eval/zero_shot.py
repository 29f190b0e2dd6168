"""Zero-shot classification with a CLIP model: each image gets the class whose prompt embeds closest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from latentdiff.data.transforms import from_uint8_image
from latentdiff.errors import UserError
from latentdiff.models.clip import CLIPModel
from latentdiff.models.tokenizer import Tokenizer


@torch.no_grad()
def zero_shot_predict(clip: CLIPModel, tokenizer: Tokenizer, images: Tensor, class_prompts: Sequence[str],
                      batch_size: int = 256) -> Tensor:
    """Predicted class index per image (uint8 or [-1, 1] float, (N, C, H, W)): argmax of cosine similarity."""
    if not class_prompts:
        raise UserError("zero-shot classification needs at least one class prompt")
    was_training = clip.training
    clip.eval()
    device = clip.logit_scale.device
    text = clip.encode_text(tokenizer(list(class_prompts)).to(device))  # (K, d), unit length
    preds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = from_uint8_image(x) if x.dtype == torch.uint8 else x
        preds.append((clip.encode_image(x.to(device)) @ text.T).argmax(dim=1).cpu())
    clip.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def zero_shot_accuracy(clip: CLIPModel, tokenizer: Tokenizer, images: Tensor, labels: Tensor,
                       class_prompts: Sequence[str]) -> float:
    """Fraction of images whose most similar class prompt is their label's (chance: 1 / len(class_prompts))."""
    if len(images) != len(labels) or len(images) == 0:
        raise UserError(f"zero-shot: {len(images)} images but {len(labels)} labels")
    pred = zero_shot_predict(clip, tokenizer, images, class_prompts)
    return float((pred == labels.cpu()).float().mean())


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    idx = labels.cpu().long() * num_classes + pred.cpu().long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
