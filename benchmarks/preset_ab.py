"""Sample quality of one preset under several override sets, over training seeds, at equal step counts.

    python benchmarks/preset_ab.py --preset mnist --seeds 0 1 \
        --variant "transformer fp32=train.precision=fp32" \
        --variant "transformer bf16=train.precision=bf16" \
        --variant "plain bf16=unet.attention_block=plain train.precision=bf16" [--n-eval 500] [--threads 1]

Each (variant, seed) trains the preset with those overrides (``train.seed=N``; the preset's steps, no time
limit, so a busy machine changes the wall time, not the result) into ``--work/VARIANT/seed-N`` in this
process, then scores FID / precision / recall of ``--n-eval`` DDIM-50 samples against as many held-out
images in the shipped domain classifier's features; a class-conditional preset also gets its class accuracy
and FID with labels (--n-eval samples, the classes in turn, the preset's guidance). A run whose folder
already holds quality.json is read back, not retrained, so the work can be split over processes (``--only``
one variant) and merged: every process rewrites benchmarks/results/preset_ab_PRESET.{md,json}
from the folders that are done.
Training images/s are the runs' own (metrics.csv, first row dropped) and depend on the load: compare
speed with unet_throughput.py or cpu_step_options.py, not here.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training import make_trainer
from latentdiff.training.config import load_config

RESULTS = Path(__file__).parent / "results"
METRICS = ("fid", "precision", "recall")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=key=value key=value' -> (NAME, overrides)."""
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--variant must be 'NAME=key=value ...', got {text!r}")
    return name.strip(), overrides.split()


def run_one(preset: str, overrides: list[str], seed: int, out: Path, n_eval: int, threads: int) -> dict:
    """Train (unless done) and score one variant at one seed."""
    done = out / "quality.json"
    if done.is_file():
        return json.loads(done.read_text())
    from latentdiff.pipelines.evaluate import evaluate_samples

    extra = overrides + [f"train.seed={seed}", f"train.threads={threads}", "train.time_limit=0",
                         "train.checkpoint_every=0"]
    make_trainer(load_config(preset, extra), out, device="cpu", progress=False).run()
    with open(out / "metrics.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    q = evaluate_samples(out, n_eval, batch_size=250, steps=50)
    row = {k: q[k] for k in METRICS} | {"seed": seed, "overrides": overrides, "n_eval": n_eval,
                                         "train_img_per_s": statistics.mean(rates[1:] or rates)}
    row |= class_scores(out, n_eval)
    done.write_text(json.dumps(row, indent=2))
    return row


def class_scores(model: Path, n: int) -> dict:
    """Class accuracy (the shipped domain classifier agrees with the asked class) and FID of n labelled samples
    at the model's default guidance; {} for a model without classes."""
    from latentdiff.eval.features import DomainFeatures, accuracy
    from latentdiff.eval.stats import fid_from_features
    from latentdiff.pipelines.evaluate import reference_images
    from latentdiff.pipelines.generate import Pipeline

    pipe = Pipeline.load(model)
    classes = pipe.unet.config.num_classes or 0
    if not classes:
        return {}
    labels = [i % classes for i in range(n)]
    images = torch.cat([pipe.generate(len(labels[i:i + 250]), 250, 50, "ddim", seed=i, class_label=labels[i:i + 250])
                        for i in range(0, n, 250)])
    domain = DomainFeatures.shipped(pipe.manifest.data.source)
    real, _ = reference_images(pipe.manifest, n)
    return {"class_accuracy": accuracy(domain, images, torch.tensor(labels)),
            "class_fid": float(fid_from_features(domain(images), domain(real)))}


def write(preset: str, variants: dict[str, list[str]], work: Path, argv: list[str], note: str = "") -> None:
    """Results table from every finished folder (other processes' too)."""
    rows = {name: [json.loads(p.read_text()) for p in sorted((work / slug(name)).glob("seed-*/quality.json"))]
            for name in variants}
    lines = [f"# `{preset}` under override sets: sample quality at equal steps", "",
             f"machine: {cpu_name()}, torch {torch.__version__}  ", f"command: `python {shlex.join(argv)}`", "",
             *([f"> {note}", ""] if note else []),
             "| variant | overrides | seeds | FID | precision | recall | FID per seed | train img/s (load-dependent) |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for name, overrides in variants.items():
        r = rows[name]
        if not r:
            continue
        mean = {k: statistics.mean(x[k] for x in r) for k in METRICS}
        per_seed = " / ".join(f"{x['fid']:.1f}" for x in r)
        if "class_accuracy" in r[0]:  # class-conditional: the labelled samples' scores too
            per_seed += "; with labels: accuracy " + " / ".join(f"{100 * x['class_accuracy']:.1f} %" for x in r) \
                + ", FID " + " / ".join(f"{x['class_fid']:.1f}" for x in r)
        lines.append(f"| {name} | `{' '.join(overrides)}` | {', '.join(str(x['seed']) for x in r)} | "
                     f"{mean['fid']:.1f} | {mean['precision']:.2f} | {mean['recall']:.2f} | {per_seed} | "
                     f"{statistics.mean(x['train_img_per_s'] for x in r):.0f} |")
    n = next((x["n_eval"] for r in rows.values() for x in r), 0)
    lines += ["", f"FID / precision / recall: {n} DDIM-50 samples (EMA weights; a class-conditional model's "
              f"unconditional ones, the null class) against {n} held-out images in the shipped domain classifier's "
              "features (not Inception: compare only at equal n). With labels: the classes in turn at the preset's "
              "guidance; accuracy = the same classifier names the asked class."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"preset_ab_{preset}.md").write_text(text)
    (RESULTS / f"preset_ab_{preset}.json").write_text(json.dumps({"preset": preset, "rows": rows}, indent=2))


def slug(name: str) -> str:
    """A folder name for a variant."""
    return "".join(c if c.isalnum() else "-" for c in name)


def main() -> None:
    """Train and score every (variant, seed) not yet done, then write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--variant", action="append", required=True, help="'NAME=key=value key=value ...'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", default=None, help="train only this variant (the table lists every finished one)")
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="default runs/bench-preset-ab-PRESET")
    ap.add_argument("--note", default="", help="a line for the results page (e.g. what the preset was then)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = dict(parse_variant(v) for v in args.variant)
    work = args.work or Path(f"runs/bench-preset-ab-{args.preset}")
    for seed in args.seeds:  # seed-major: a partial table already compares every variant
        for name, overrides in variants.items():
            if args.only not in (None, name):
                continue
            row = run_one(args.preset, overrides, seed, work / slug(name) / f"seed-{seed}", args.n_eval, args.threads)
            print(name, seed, {k: round(row[k], 3) for k in METRICS}, flush=True)
    write(args.preset, variants, work, sys.argv, args.note)


if __name__ == "__main__":
    main()
