"""What a training step of ldm-shapes variants costs, against the preset's, measured interleaved in one process.

    python benchmarks/ldm_step_cost.py --variant unet.attention_resolutions=[1,2]

Each variant is the ldm-shapes preset with some overrides (several per --variant, separated by spaces).
One step = the UNet's forward and backward on a batch of the preset's size (8x8x8 latents, random
384-wide contexts of 20 tokens, as the cached MiniLM states) and a fused AdamW update; the text
encoder is frozen and cached, so it costs nothing per step. Variants run in turns (round robin), so
a machine that slows down or speeds up affects them alike; the table gives median milliseconds and
the ratio to the preset. Writes benchmarks/results/ldm_step_cost.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.models.unet import UNet
from latentdiff.training.config import load_config


def build(overrides: list[str]) -> tuple[UNet, torch.optim.Optimizer, int, int]:
    """The variant's UNet, its AdamW, batch size and context length."""
    cfg = load_config("ldm-shapes", overrides)
    unet = UNet(cfg.unet)
    return unet, torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True), cfg.train.batch_size, \
        cfg.cond.context_length


def step(unet: UNet, opt: torch.optim.Optimizer, batch: int, tokens: int, g: torch.Generator) -> float:
    """Seconds of one forward, backward and optimiser step."""
    c = unet.config
    x = torch.randn(batch, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(batch, tokens, c.context_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t0 = time.perf_counter()
    loss = (unet(x, t, ctx) - x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], help="overrides of one variant, space-separated")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"preset": []} | {v: v.split() for v in args.variant}
    built = {name: build(ov) for name, ov in variants.items()}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 3):
        for name, (unet, opt, batch, tokens) in built.items():
            dt = step(unet, opt, batch, tokens, g)
            if r >= 3:  # warm-up rounds are not counted
                times[name].append(dt)
    med = {name: 1000 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    lines = ["# Training-step cost of ldm-shapes variants (interleaved, same process)", "",
             f"Machine: {cpu_name()}, {args.threads} threads. Command: `python benchmarks/ldm_step_cost.py "
             + " ".join(f"--variant '{v}'" for v in args.variant) + f" --rounds {args.rounds}`.", "",
             "| variant | parameters | batch | ms per step (median) | vs preset |", "|---|---:|---:|---:|---:|"]
    for name, (unet, _, batch, _) in built.items():
        n = sum(p.numel() for p in unet.parameters())
        lines.append(f"| {name} | {n:,} | {batch} | {med[name]:.1f} | {med[name] / med['preset']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / "ldm_step_cost.md").write_text(text)


if __name__ == "__main__":
    main()
