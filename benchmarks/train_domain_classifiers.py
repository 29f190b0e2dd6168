"""Train the domain classifiers that ship with latentdiff as feature networks for FID-style metrics.

    python benchmarks/train_domain_classifiers.py                 # both, into the package
    python benchmarks/train_domain_classifiers.py --only mnist5k --out /tmp/classifiers

Writes <out>/<name>/{config.json, model.safetensors, metrics.json}; metrics.json holds the test
accuracy, the data fingerprints and this command. CPU, 2 threads, a few minutes per classifier.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from latentdiff.data import DataConfig
from latentdiff.eval.features import train_classifier

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "eval" / "weights"

# One recipe per shipped classifier: batch 128, AdamW with warm-up and cosine decay, no augmentation.
RECIPES = {
    "fashion-mnist": dict(steps=1200, batch_size=128, lr=2e-3, seed=0),  # ~2.6 epochs of 60k images
    "mnist5k": dict(steps=600, batch_size=128, lr=2e-3, seed=0),  # ~17 epochs of ~4.5k images
}


def main() -> None:
    """Train the selected recipes and print each one's test accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only these (repeatable)")
    ap.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS, help="parent folder of the classifier folders")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the shipped files used 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    print(f"# {command}\n# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} threads")
    for name in args.only or list(RECIPES):
        m = train_classifier(DataConfig(source=name), out_folder=args.out / name, command=command, **RECIPES[name])
        print(f"{name}: test accuracy {m['test_accuracy']:.4f} on {m['n_test']} images, "
              f"{m['steps']} steps in {m['train_seconds']:.0f} s -> {args.out / name}")


if __name__ == "__main__":
    main()
