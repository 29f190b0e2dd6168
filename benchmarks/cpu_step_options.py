"""Which CPU settings make a real training step fastest: threads, channels_last, bf16 autocast.

    python benchmarks/cpu_step_options.py [--rounds 6] [--steps 4] [--presets ldm-fashion ldm-shapes]

For each preset a real trainer is built (a 1-step autoencoder first for the latent presets, the data
cut to 1 024 images: a step's cost does not depend on the data set's size) and its ``train_step`` —
data draw, forward, loss, backward, clipping, fused AdamW, EMA — is timed under every combination of
torch threads (1, 2), memory format (contiguous, channels_last) and precision (fp32, bf16 autocast).
The combinations are interleaved round by round, so a load that comes and goes hits them alike; the
table gives the median milliseconds per step and images/s, and the speed relative to fp32, contiguous, all
threads (what train.precision=auto picks on this CPU is stated above the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training import make_trainer
from latentdiff.training.config import load_config
from latentdiff.training.step import auto_precision

AE_OF = {"ldm-fashion": "ae-fashion", "ldm-shapes": "ae-shapes"}
SMALL = ["data.limit=1024", "train.checkpoint_every=0", "train.log_every=0"]


def build(preset: str, work: Path, channels_last: bool):
    """A trainer of ``preset`` on 1 024 images (latent presets: on a 1-step autoencoder's latents)."""
    extra = []
    if preset in AE_OF:
        ae = work / "ae"
        if not (ae / "model_index.json").is_file():
            cfg = load_config(AE_OF[preset], SMALL + ["train.steps=1", "train.grid_samples=4"])
            make_trainer(cfg, ae, device="cpu", progress=False).run()
        extra = [f"latent.autoencoder={ae}"]
    trainer = make_trainer(load_config(preset, SMALL + extra), work / f"{preset}-{channels_last}", device="cpu",
                           progress=False)
    if channels_last:
        trainer.model.to(memory_format=torch.channels_last)
    for _ in range(2):  # allocations, oneDNN primitives
        trainer.train_step()
    return trainer


def time_steps(trainer, steps: int) -> float:
    """Seconds per step over ``steps`` real training steps."""
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    """Measure every combination and write benchmarks/results/cpu_step_options.{md,json}."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["ldm-fashion", "ldm-shapes"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="steps timed per combination and round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rows, load0 = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            trainers = {cl: build(preset, Path(tmp) / preset, cl) for cl in (False, True)}
            batch = trainers[False].cfg.train.batch_size
            combos = [(th, cl, p) for th in args.threads for cl in (False, True) for p in ("fp32", "bf16")]
            times: dict[tuple, list[float]] = {c: [] for c in combos}
            for _ in range(args.rounds):
                for th, cl, p in combos:
                    torch.set_num_threads(th)
                    trainers[cl].cfg.train.precision = p
                    times[(th, cl, p)].append(time_steps(trainers[cl], args.steps))
            base = statistics.median(times[(max(args.threads), False, "fp32")])
            for (th, cl, p), ts in times.items():
                med = statistics.median(ts)
                rows.append({"preset": preset, "batch": batch, "threads": th, "channels_last": cl, "precision": p,
                             "ms_per_step": 1000 * med, "images_per_s": batch / med, "speed_vs_fp32": base / med})
    machine = f"{cpu_name()}, torch {torch.__version__}"
    lines = ["# CPU training-step options", "", f"machine: {machine}  ",
             f"command: `python {' '.join(sys.argv)}`  ",
             f"median of {args.rounds} interleaved rounds of {args.steps} steps; baseline = fp32, contiguous, "
             f"{max(args.threads)} threads; train.precision=auto here: {auto_precision(torch.device('cpu'))}  ",
             f"load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
             "(other processes: with more runnable threads than cores, several torch threads wait on each other)", "",
             "| preset | batch | threads | channels_last | precision | ms/step | images/s | vs baseline |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['preset']} | {r['batch']} | {r['threads']} | {'yes' if r['channels_last'] else 'no'} | "
              f"{r['precision']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {r['speed_vs_fp32']:.2f}x |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "cpu_step_options.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
