"""Where a training step of the demo's models goes: the AdamW update, fused or per-tensor, same process.

    python benchmarks/train_step.py [--iters 40] [--threads 2]

For the UNet of ldm-shapes and the autoencoder of ae-shapes (with its perceptual net's weights excluded:
they are frozen), the table gives the milliseconds of one AdamW step with torch's default (per-tensor
``foreach`` loop) and with ``fused=True`` (what the trainers use, ``TrainingRun.adamw``), and the ratio.
Gradients are random: the optimiser's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training.config import load_config
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.models.unet import UNet


def step_ms(params: list[torch.nn.Parameter], iters: int, **kw) -> float:
    """Median milliseconds of one AdamW step over ``iters`` steps (after 3 warm-up steps)."""
    opt = torch.optim.AdamW(params, lr=1e-4, **kw)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    """Run the comparison and write benchmarks/results/train_step.{md,json}."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"UNet of ldm-shapes": UNet(load_config("ldm-shapes", []).unet),
              "autoencoder of ae-shapes": Autoencoder(load_config("ae-shapes", []).autoencoder)}
    rows = []
    for name, model in models.items():
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        per_tensor, fused = step_ms(params, args.iters), step_ms(params, args.iters, fused=True)
        rows.append({"model": name, "parameters": sum(p.numel() for p in params), "tensors": len(params),
                     "per_tensor_ms": per_tensor, "fused_ms": fused, "speedup": per_tensor / fused})
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"# AdamW step: per-tensor vs fused\n\n{machine}; `{' '.join(['python', *sys.argv])}`; median of "
             f"{args.iters} steps.\n", "| model | parameters | tensors | per-tensor ms | fused ms | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['tensors']} | {r['per_tensor_ms']:.2f} | "
              f"{r['fused_ms']:.2f} | {r['speedup']:.1f}x |" for r in rows]
    out = Path(__file__).parent / "results" / "train_step.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
