"""Zero-shot classification of the project's own CLIP on held-out Fashion-MNIST (issue: conditioning).

    python benchmarks/clip_zero_shot.py --steps 600

Trains the clip-fashion preset (captions "a photo of a {class}", a BPE tokenizer trained on them, an
SD-shaped causal text transformer and a small ViT, symmetric InfoNCE), then classifies the 10 000
test images by the most similar class prompt. Chance is 10 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training.config import load_config
from latentdiff.data import DataConfig, load_dataset
from latentdiff.eval.zero_shot import zero_shot_accuracy
from latentdiff.models.clip import load_clip
from latentdiff.training import make_trainer
from latentdiff.training.clip_trainer import class_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-clip-fashion"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("clip-fashion", [f"train.steps={args.steps}", "train.sample_every=0"])
    t0 = time.perf_counter()
    make_trainer(cfg, args.out, progress=False).run()
    train_s = time.perf_counter() - t0
    clip, tokenizer = load_clip(args.out)
    test = load_dataset(DataConfig(source="fashion-mnist", split="test", image_size=28))
    prompts = class_prompts(test, cfg.clip.caption_template)  # the training captions' template, as the trainer
    acc = zero_shot_accuracy(clip, tokenizer, test.images, test.labels, prompts)
    row = {"machine": cpu_name(), "steps": args.steps, "batch_size": cfg.train.batch_size,
           "train_seconds": train_s, "test_images": len(test), "zero_shot_accuracy": acc,
           "command": f"python benchmarks/clip_zero_shot.py --steps {args.steps}"}
    print(row)
    res = Path(__file__).parent / "results"
    (res / "clip_zero_shot.json").write_text(json.dumps(row, indent=2))
    (res / "clip_zero_shot.md").write_text(
        "# Zero-shot classification of the own CLIP (Fashion-MNIST test split)\n\n"
        f"Machine: {row['machine']}. Command: `{row['command']}`.\n\n"
        "| steps × batch | training time | test images | zero-shot accuracy | chance |\n|---:|---:|---:|---:|---:|\n"
        f"| {args.steps} × {cfg.train.batch_size} | {train_s:.0f} s | {len(test)} | {100 * acc:.1f} % | 10 % |\n\n"
        "Class prompts: `" + "`, `".join(prompts) + "`. The model never saw the test images; the prompts are "
        "the training captions' template, as in CLIP's zero-shot protocol.\n")


if __name__ == "__main__":
    main()
