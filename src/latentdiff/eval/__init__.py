"""Metrics: reconstruction (PSNR, SSIM), sample quality (FID, CMMD, precision / recall) on pluggable features."""

from latentdiff.eval.features import (
    SHIPPED,
    DomainFeatures,
    FeatureExtractor,
    InceptionFeatures,
    build_extractor,
    train_classifier,
)
from latentdiff.eval.image_metrics import psnr, ssim
from latentdiff.eval.report import evaluate, reconstruction_report
from latentdiff.eval.stats import feature_stats, fid_from_features, frechet_distance, mmd_rbf, precision_recall

__all__ = [
    "SHIPPED", "DomainFeatures", "FeatureExtractor", "InceptionFeatures", "build_extractor", "train_classifier",
    "psnr", "ssim", "evaluate", "reconstruction_report",
    "feature_stats", "fid_from_features", "frechet_distance", "mmd_rbf", "precision_recall",
]  # fmt: skip
