"""Class accuracy and FID of a class-conditional model over the classifier-free guidance scale.

    python benchmarks/class_guidance.py --ae runs/bench-latent-vs-pixel/ae --steps 3000 --n-per-class 50

Trains (or reuses, with --model) the ldm-fashion-class preset, then for each guidance scale draws
n_per_class samples of every class with the same seeds and asks the shipped Fashion-MNIST domain
classifier (91.9 % on real test images) which class each sample shows. FID is against held-out real
images with the same domain features, so it shows what guidance costs in diversity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training.config import load_config
from latentdiff.data import DataConfig, load_dataset
from latentdiff.eval.features import DomainFeatures
from latentdiff.eval.stats import fid_from_features
from latentdiff.pipelines.generate import Pipeline
from latentdiff.training import make_trainer

SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ae", type=Path, default=Path("runs/bench-latent-vs-pixel/ae"))
    ap.add_argument("--model", type=Path, default=None, help="a trained class-conditional model folder")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-class-guidance"))
    ap.add_argument("--steps", type=int, default=3000, help="training steps (batch 64)")
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--sampler-steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, train_s = args.model, None
    if model is None:
        cfg = load_config("ldm-fashion-class", [f"latent.autoencoder={args.ae}", f"train.steps={args.steps}"])
        t0 = time.perf_counter()
        make_trainer(cfg, args.out, progress=False).run()
        model, train_s = args.out, time.perf_counter() - t0
    pipe = Pipeline.load(model)
    domain = DomainFeatures.shipped("fashion-mnist")
    real = load_dataset(DataConfig(source="fashion-mnist", split="test", image_size=32, limit=2000)).images
    real_feats = domain(real)
    rows = []
    for scale in SCALES:
        t0 = time.perf_counter()
        images, labels = [], []
        for c in range(10):  # the same seeds for every scale and class: rows differ only by guidance
            images.append(pipe.generate(args.n_per_class, 100, args.sampler_steps, "ddim", seed=1000,
                                        class_label=c, guidance=scale))
            labels += [c] * args.n_per_class
        images = torch.cat(images)
        pred = domain.logits(images).argmax(1)
        acc = float((pred == np.asarray(labels)).mean())
        fid = fid_from_features(domain(images), real_feats)
        rows.append({"guidance": scale, "class_accuracy": acc, "fid": fid, "n": len(images),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    write(rows, model, train_s, args)


def write(rows: list[dict], model: Path, train_s: float | None, args: argparse.Namespace) -> None:
    """benchmarks/results/class_guidance.{json,md}."""
    res = Path(__file__).parent / "results"
    meta = {"machine": cpu_name(), "model": str(model), "train_seconds": train_s, "train_steps": args.steps,
            "n_per_class": args.n_per_class, "sampler": f"ddim {args.sampler_steps} steps",
            "command": "python benchmarks/class_guidance.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    (res / "class_guidance.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Class accuracy vs classifier-free guidance (Fashion-MNIST, class-conditional LDM)", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`.", "",
             f"Samples: {args.n_per_class} per class × 10 classes, {meta['sampler']}, the same seeds for every "
             "row. Class accuracy: the shipped Fashion-MNIST domain classifier (91.9 % on real test images) "
             "agrees with the requested class. FID: domain features, against 2 000 held-out real images.", "",
             "| guidance | class accuracy | FID |", "|---:|---:|---:|"]
    lines += [f"| {r['guidance']:g} | {100 * r['class_accuracy']:.1f} % | {r['fid']:.1f} |" for r in rows]
    (res / "class_guidance.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
