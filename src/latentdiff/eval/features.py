"""Feature extractors for FID-style metrics: one interface, uint8 images in, float64 features out.

- ``InceptionFeatures``: pool3 of FID's Inception-v3, weights supplied by the user (comparable with
  published FIDs only with pytorch-fid's ``pt_inception-2015-12-05`` file).
- ``DomainFeatures``: the penultimate layer of a small classifier trained on the domain; two ship
  with the package ("domain:fashion-mnist", "domain:mnist5k"); ``train_classifier`` makes more.
Numbers from different extractors are not comparable with each other; reports carry the name.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import platform
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.data import DataConfig, load_dataset
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import (load_into, load_json_object, load_tensors, naming_file, save_json,
                                           save_tensors)
from latentdiff.models.classifier import Classifier, ClassifierConfig, prepare_images
from latentdiff.models.inception import FEATURE_DIM, load_fid_inception

SHIPPED = ("fashion-mnist", "mnist5k")  # domain classifiers under latentdiff/eval/weights/


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images (N, C, H, W) to float64 features (N, dim); `name` labels the numbers it gives."""

    name: str
    dim: int

    def __call__(self, images: Tensor) -> np.ndarray: ...


def check_images(images: Any, what: str = "images") -> Tensor:
    """A uint8 (N, C, H, W) tensor with C in (1, 3), or a UserError naming the dtype and shape."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[1] not in (1, 3) or t.shape[0] == 0:
        raise UserError(f"{what}: expected uint8 images of shape (N, 1 or 3, H, W), "
                        f"got {t.dtype} {tuple(t.shape)}")
    return t


def _run_batched(fn: Any, images: Tensor, batch_size: int) -> np.ndarray:
    """Apply fn to batches under inference_mode and stack the float64 results."""
    out = []
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch_size):
            out.append(fn(images[i : i + batch_size]).double().cpu().numpy())
    return np.concatenate(out)


class DomainFeatures:
    """Penultimate-layer features of a domain classifier (images resized / converted to what it was trained on)."""

    def __init__(self, model: Classifier, name: str, metrics: dict[str, Any] | None = None,
                 batch_size: int = 500, device: str | torch.device = "cpu") -> None:
        self.model, self.name, self.metrics = model.to(device).eval(), name, metrics or {}
        self.dim, self.batch_size, self.device = model.config.feature_dim, batch_size, torch.device(device)

    @classmethod
    def load(cls, folder: Path | str, name: str | None = None, **kw: Any) -> DomainFeatures:
        """Load a classifier folder (config.json, model.safetensors, optional metrics.json)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a classifier folder (config.json not found)")
        with naming_file(folder / "config.json"):
            cfg = ClassifierConfig.from_dict(load_json_object(folder / "config.json"))
            model = Classifier(cfg)
        load_into(model, load_tensors(folder / "model.safetensors"), str(folder / "model.safetensors"))
        metrics = load_json_object(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
        return cls(model, name or f"domain:{folder}", metrics, **kw)

    @classmethod
    def shipped(cls, which: str, **kw: Any) -> DomainFeatures:
        """One of the classifiers that ship with the package (SHIPPED)."""
        if which not in SHIPPED:
            raise UserError(f"domain features {which!r}: unknown; shipped: {', '.join(SHIPPED)}")
        res = importlib.resources.files("latentdiff.eval") / "weights" / which
        with importlib.resources.as_file(res) as folder:  # a real folder even from a zipped install
            return cls.load(folder, f"domain:{which}", **kw)

    def logits(self, images: Tensor) -> np.ndarray:
        """Class logits (N, num_classes) of uint8 images, for accuracy checks."""
        images = check_images(images)
        return _run_batched(lambda b: self.model(prepare_images(b.to(self.device), self.model.config)),
                            images, self.batch_size)

    def __call__(self, images: Tensor) -> np.ndarray:
        """Features (N, feature_dim) in float64."""
        images = check_images(images)
        return _run_batched(lambda b: self.model.features(prepare_images(b.to(self.device), self.model.config)),
                            images, self.batch_size)


class InceptionFeatures:
    """2048-d pool3 features of FID's Inception-v3 from a user-supplied weights file."""

    def __init__(self, weights_path: Path | str, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        self.model = load_fid_inception(weights_path).to(device)
        self.name, self.dim = f"inception:{Path(weights_path).name}", FEATURE_DIM
        self.batch_size, self.device = batch_size, torch.device(device)

    def __call__(self, images: Tensor) -> np.ndarray:
        """Features (N, 2048) in float64; grey images are repeated to RGB as pytorch-fid's loader does."""
        images = check_images(images)

        def run(b: Tensor) -> Tensor:
            x = b.to(self.device).float() / 255  # the same [0, 1] floats as torchvision's ToTensor
            return self.model(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

        return _run_batched(run, images, self.batch_size)


def build_extractor(kind: str, path: str | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """'inception' (path: weights file), 'domain' (path: classifier folder) or 'domain:<shipped name>'."""
    if kind == "inception" or kind == "domain":
        if not path:
            raise UserError(f"feature extractor {kind!r} needs a path "
                            f"({'Inception weights file' if kind == 'inception' else 'classifier folder'})")
        if kind == "inception":
            return InceptionFeatures(path, device=device)
        return DomainFeatures.load(path, device=device)
    if kind.startswith("domain:"):
        if path:
            raise UserError(f"feature extractor {kind!r} is shipped with the package; drop the path {path!r}")
        return DomainFeatures.shipped(kind.split(":", 1)[1], device=device)
    choices = ", ".join(["inception", "domain"] + [f"domain:{s}" for s in SHIPPED])
    raise UserError(f"feature extractor {kind!r}: unknown; choose one of {choices}")


def accuracy(extractor: DomainFeatures, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of a domain classifier on labelled uint8 images."""
    return float((extractor.logits(images).argmax(1) == np.asarray(labels)).mean())


def train_classifier(data_cfg: DataConfig, steps: int, batch_size: int, lr: float, seed: int,
                     out_folder: Path | str, command: str | None = None) -> dict[str, Any]:
    """Train a domain classifier on data_cfg's labelled images, test it on the test split, save the folder."""
    if data_cfg.split != "train":
        raise UserError(f"data.split: train_classifier trains on 'train' and tests on 'test', got {data_cfg.split!r}")
    t0 = time.time()
    train = load_dataset(data_cfg)
    test = load_dataset(dataclasses.replace(data_cfg, split="test", limit=None))
    if train.labels is None or test.labels is None:
        raise UserError(f"data.source {data_cfg.source!r}: a classifier needs labelled images")
    cfg = ClassifierConfig(in_channels=data_cfg.channels, image_size=data_cfg.image_size,
                           num_classes=len(train.class_names), class_names=list(train.class_names))
    torch.manual_seed(seed)
    model = Classifier(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    # Linear warm-up then cosine decay to zero: reaches a good optimum in few epochs without tuning.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    order, pos, losses = torch.randperm(len(train), generator=gen), 0, []
    for _ in range(steps):
        if pos + batch_size > len(order):  # a fresh permutation per epoch; drop the ragged tail
            order, pos = torch.randperm(len(train), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(train.batch(idx)), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    name = f"domain:{data_cfg.source}"
    acc = accuracy(DomainFeatures(model, name), test.images, test.labels)
    call = (f"train_classifier(DataConfig(**{data_cfg.to_dict()!r}), steps={steps}, batch_size={batch_size}, "
            f"lr={lr}, seed={seed}, out_folder=...)")
    metrics = {
        "test_accuracy": acc, "n_test": len(test), "n_train": len(train),
        "train_fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint,
        "data": data_cfg.to_dict(), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "final_loss": float(np.mean(losses[-50:])), "train_seconds": round(time.time() - t0, 1),
        "call": call, "command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.system()}",
    }
    out = Path(out_folder)
    save_tensors(model.state_dict(), out / "model.safetensors")
    save_json(cfg.to_dict(), out / "config.json")
    save_json(metrics, out / "metrics.json")  # written last: a folder with metrics.json is complete
    return metrics
