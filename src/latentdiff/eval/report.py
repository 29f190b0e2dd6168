"""Evaluation reports: sample quality (FID, CMMD, precision / recall) and reconstruction quality."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentdiff.errors import UserError
from latentdiff.eval.features import FeatureExtractor, check_images
from latentdiff.eval.image_metrics import psnr, ssim
from latentdiff.eval.stats import fid_from_features, mmd_rbf, precision_recall


def _unit_rows(f: np.ndarray) -> np.ndarray:
    # CMMD's σ = 10 was chosen for L2-normalised CLIP embeddings; normalising keeps that scale meaningful.
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def evaluate(real: torch.Tensor, fake: torch.Tensor, extractor: FeatureExtractor, k: int = 3) -> dict[str, Any]:
    """FID, CMMD (on L2-normalised features), precision and recall (k-NN) of fake vs real uint8 images."""
    real, fake = check_images(real, "real images"), check_images(fake, "fake images")
    if min(len(real), len(fake)) <= k:
        raise UserError(f"evaluate: need more than k={k} images per set, got {len(real)} real and {len(fake)} fake")
    return evaluate_features(extractor(real), extractor(fake), extractor.name, k)


def evaluate_features(fr: torch.Tensor, ff: torch.Tensor, feature: str, k: int = 3) -> dict[str, Any]:
    """:func:`evaluate` on features already extracted (real (N, D), fake (M, D)): what a streaming run keeps."""
    if min(len(fr), len(ff)) <= k:
        raise UserError(f"evaluate: need more than k={k} images per set, got {len(fr)} real and {len(ff)} fake")
    precision, recall = precision_recall(fr, ff, k=k)
    return {
        "feature": feature,
        "n_real": len(fr),
        "n_fake": len(ff),
        "fid": fid_from_features(fr, ff),  # biased upwards for small n: compare only at equal n
        "cmmd": mmd_rbf(_unit_rows(fr), _unit_rows(ff)),
        "precision": precision,
        "recall": recall,
        "k": k,
    }


def reconstruction_report(originals: torch.Tensor, reconstructions: torch.Tensor,
                          extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """PSNR and SSIM (data range 255) of uint8 reconstructions, plus rFID when an extractor is given."""
    a, b = check_images(originals, "originals"), check_images(reconstructions, "reconstructions")
    if a.shape != b.shape:
        raise UserError(f"reconstruction_report: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    out: dict[str, Any] = {"n": len(a), "psnr": psnr(a, b, 255.0)}
    h, w = a.shape[-2:]
    out["ssim"] = ssim(a, b, 255.0) if min(h, w) >= 11 else None  # None: too small for the 11x11 window
    if extractor is not None:
        out["feature"] = extractor.name
        out["rfid"] = fid_from_features(extractor(a), extractor(b))
    return out
