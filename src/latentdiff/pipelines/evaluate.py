"""Measure a model folder: sample quality of a diffusion model, reconstruction quality of an autoencoder.

Real images are loaded at the model's size and, like the generated ones, resized by the feature
network to its input, so neither side is favoured by resampling. The same images and settings always give the same
numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from latentdiff.data import DataConfig, load_dataset
from latentdiff.data.transforms import from_uint8_image, to_uint8_image
from latentdiff.errors import UserError
from latentdiff.eval.features import SHIPPED, FeatureExtractor, build_extractor, check_images
from latentdiff.eval.report import evaluate_features, reconstruction_report
from latentdiff.models.folder import Manifest, load_autoencoder, read_manifest
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.generate import Pipeline


def default_features(source: str) -> str:
    """The shipped domain feature network for an embedded data set, if there is one."""
    if source in SHIPPED:
        return f"domain:{source}"
    raise UserError(f"no shipped feature network for data source {source!r}; pass --features "
                    f"(domain:PATH to a classifier folder, or inception:PATH to FID Inception weights)")


def parse_features(spec: Optional[str], source: str, device: str) -> FeatureExtractor:
    """'domain:fashion-mnist', 'domain:PATH' or 'inception:PATH' (None: the data set's shipped one)."""
    spec = spec or default_features(source)
    kind, _, arg = spec.partition(":")
    if kind == "domain" and arg in SHIPPED:
        return build_extractor(spec, device=device)
    if kind in ("domain", "inception") and arg:
        return build_extractor(kind, arg, device=device)
    raise UserError(f"--features {spec!r}: expected domain:NAME, domain:PATH or inception:PATH")


def _data_source(manifest: Manifest) -> str:
    """The data set a model was trained on; converted checkpoints name none."""
    if manifest.data is None:
        raise UserError(f"the model names no training data set (source: {manifest.source or 'unknown'}): "
                        "there are no held-out images to compare with")
    return manifest.data.source


def reference_images(manifest: Manifest, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to n held-out images (uint8) of the model's data set, at the model's size, and their labels."""
    cfg = DataConfig(source=_data_source(manifest), image_size=manifest.image_size, channels=manifest.channels,
                     split=split, limit=n)
    data = load_dataset(cfg)
    return data.images, data.labels


def evaluate_samples(model_dir: Path | str, n_samples: int = 1000, batch_size: int = 100, steps: int = 50,
                     sampler: str = "ddim", seed: int = 0, features: Optional[str] = None,
                     eta: Optional[float] = None, spacing: Optional[str] = None, device: str = "cpu",
                     progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """FID, CMMD, precision/recall of n generated images against n held-out real ones.

    The defaults (DDIM, 50 trailing steps) are the measurement protocol of the documented numbers, not the
    generation defaults: compare FIDs only at equal settings.
    """
    pipe = Pipeline.load(model_dir, device)
    settings = SampleSettings(n_samples, batch_size, steps, sampler, seed, spacing=spacing, eta=eta)
    pipe.check(settings)
    extractor = parse_features(features, _data_source(pipe.manifest), device)
    real, _ = reference_images(pipe.manifest, n_samples)
    fake_features, nfe, seconds = stream_features(pipe, settings, extractor, progress)
    report = evaluate_features(extractor(check_images(real, "real images")), fake_features, extractor.name)
    sampler, spacing = settings.resolved
    return report | {"model": str(model_dir), "sampler": sampler, "spacing": spacing, "steps": steps,
                     "nfe_per_sample": nfe, "seed": seed, "sample_seconds_per_image": seconds / n_samples}


def stream_features(pipe: Pipeline, settings: SampleSettings, extractor: Callable[[torch.Tensor], torch.Tensor],
                    progress: Optional[Callable[[int, int], None]] = None) -> tuple[Any, float, float]:
    """Features of ``settings.n_samples`` generated images, drawn batch by batch (image i from seed + i, as in a
    whole run) and dropped once their features are taken: memory holds features, not images.
    Returns (features (N, D), as the extractor gives them, NFE per image, seconds spent sampling)."""
    n, b = settings.n_samples, settings.batch_size
    total = -(-n // b) * settings.steps
    feats, nfe_sum, seconds = [], 0.0, 0.0
    for start in range(0, n, b):
        end = min(n, start + b)
        done = (start // b) * settings.steps
        hook = None if progress is None else (lambda d, _t, done=done: progress(min(done + d, total), total))
        t0 = time.perf_counter()
        images, nfe = pipe.run(settings.replace(n_samples=end - start, seed=settings.seed + start), callback=hook)
        seconds += time.perf_counter() - t0
        feats.append(extractor(check_images(images, "fake images")))
        nfe_sum += nfe * (end - start)
    joined = np.concatenate(feats) if isinstance(feats[0], np.ndarray) else torch.cat(feats)  # the extractor's type
    return joined, nfe_sum / n, seconds


@torch.no_grad()
def evaluate_reconstruction(model_dir: Path | str, n: int = 1000, features: Optional[str] = None,
                            device: str = "cpu") -> dict[str, Any]:
    """PSNR, SSIM and rFID of an autoencoder on held-out images (posterior mode, no sampling)."""
    manifest = read_manifest(model_dir)
    ae = load_autoencoder(model_dir, device)
    source = _data_source(manifest)
    originals, _ = reference_images(manifest, n)
    recon = []
    for i in range(0, len(originals), 100):
        x = from_uint8_image(originals[i:i + 100]).to(device)
        recon.append(to_uint8_image(ae(x, sample_posterior=False)[0]).cpu())
    extractor = parse_features(features, source, device) if features or source in SHIPPED else None
    return reconstruction_report(originals, torch.cat(recon), extractor) | {"model": str(model_dir)}



LAYOUT_SET = "2 objects, seen, layout"  # the two-object prompts again, drawn with layout guidance


def adherence_prompt_sets(n: int, seed: int = 0, layout: bool = False) -> dict[str, list[str]]:
    """The shapes prompts a text model is measured on: one object with seen or unseen colour–shape
    pairs, and two objects (seen pairs), n each; fixed by the seed. ``layout`` adds LAYOUT_SET: the
    same two-object prompts, for :func:`evaluate_adherence` to draw with layout guidance."""
    from latentdiff.data.shapes import eval_prompts

    sets = {"1 object, seen": eval_prompts(n, 1, True, seed), "1 object, unseen": eval_prompts(n, 1, False, seed + 1),
            "2 objects, seen": eval_prompts(n, 2, True, seed + 2)}
    return sets | ({LAYOUT_SET: sets["2 objects, seen"]} if layout else {})


def evaluate_adherence(pipe: Pipeline, prompt_sets: dict[str, list[str]], steps: int = 25, sampler: str = "ddim",
                       guidance: Optional[float] = None, seed: int = 0, batch_size: int = 100) -> dict[str, Any]:
    """Generate one image per prompt (same seeds for every set) and score it with the model-free scorer.

    The set named LAYOUT_SET is drawn with layout guidance (pipelines/layout.py ``layout_images``: the first
    object alone, then the other half redrawn around it under regional prompts) and reported as its own
    group, outside the overall rates.
    """
    from latentdiff.eval.adherence import adherence_report
    from latentdiff.pipelines.layout import layout_images

    prompts, groups, images = [], [], []
    t0 = time.perf_counter()
    for name, group in prompt_sets.items():
        for i in range(0, len(group), batch_size):
            chunk = tuple(group[i:i + batch_size])
            settings = SampleSettings(len(chunk), batch_size, steps, sampler, seed + i, prompt=chunk, guidance=guidance)
            images.append(layout_images(pipe, settings) if name == LAYOUT_SET else pipe.run(settings).images)
        prompts += group
        groups += [name] * len(group)
    images = torch.cat(images)
    plain = [i for i, g in enumerate(groups) if g != LAYOUT_SET]
    report = adherence_report(images[plain], [prompts[i] for i in plain], [groups[i] for i in plain])
    if len(plain) < len(groups):
        laid = [i for i, g in enumerate(groups) if g == LAYOUT_SET]
        extra = adherence_report(images[laid], [prompts[i] for i in laid], [LAYOUT_SET] * len(laid))
        report["groups"] |= extra["groups"]
        by_index = dict(zip(plain, report["scores"])) | dict(zip(laid, extra["scores"]))
        report["scores"] = [by_index[i] for i in range(len(groups))]  # in the order of prompts and images
    return report | {"images": images, "prompts": prompts, "sampler": sampler, "steps": steps,
                     "guidance": guidance, "seconds_per_image": (time.perf_counter() - t0) / len(prompts)}
