"""Training step of the Stable Diffusion v1 UNet: latentdiff vs diffusers, same process, same weights.

    python benchmarks/sd_train_step.py --device cuda [--batch 8] [--steps 10] [--rounds 3]
    python benchmarks/sd_train_step.py --device cpu --channels 32 --size 16 --batch 2   # a smoke test

Both UNets get the same random weights (through latentdiff's key map), bf16 autocast with fp32 master
weights, fused AdamW, ε-MSE on 64x64x4 latents with a random 77x768 text context, batch ``--batch`` (the
issue's setting: 8). Steps are timed in interleaved rounds (the median round counts); on CUDA every round
waits for the device. Memory: the allocator's high-water mark during a step above what the model, its
gradients and AdamW's state hold (``peak extra``), and that resident part itself. ``--channels`` and
``--size`` shrink the network and latents for a CPU smoke test.
Writes benchmarks/results/sd_train_step[_cuda].{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py, beside this script
from sd_unet import paired_unets  # the same weights in both UNets

from latentdiff.models.unet import UNetConfig

RESULTS = Path(__file__).parent / "results"


def build(cfg: UNetConfig, size: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """latentdiff's UNet and diffusers' UNet2DConditionModel with the same random weights, in training mode."""
    ours, ref = paired_unets(cfg, size)
    return {"latentdiff": ours.to(device).train(), "diffusers": ref.to(device).train()}


class Contender:
    """A network, its fused AdamW and a step: bf16 autocast forward, ε-MSE, backward, update."""

    def __init__(self, name: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor):
        self.name, self.model, self.x, self.t, self.c = name, model, x, t, c
        self.opt = torch.optim.AdamW(model.parameters(), 1e-5, fused=True)
        self.rates: list[float] = []
        self.peak_extra_mib, self.resident_mib = 0.0, 0.0

    def step(self) -> None:
        noise = torch.randn_like(self.x)
        with torch.autocast(self.x.device.type, torch.bfloat16):
            out = self.model(self.x + noise, self.t, self.c)
            out = out.sample if hasattr(out, "sample") else out
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time_round(self, steps: int) -> None:
        dev = self.x.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.resident_mib = torch.cuda.memory_allocated(dev) / 2**20  # every model's weights + AdamW state
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_extra_mib = max(self.peak_extra_mib,
                                      torch.cuda.max_memory_allocated(dev) / 2**20 - self.resident_mib)
        self.rates.append(self.x.shape[0] * steps / (time.perf_counter() - t0))


def main() -> None:
    """Time both UNets' training steps, interleaved; write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per contender and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=320, help="model_channels (320: SD v1; smaller: smoke test)")
    ap.add_argument("--size", type=int, default=64, help="latent side (64: 512x512 images)")
    ap.add_argument("--out", default="sd_train_step")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    cfg = dataclasses.replace(UNetConfig.sd_v1(), model_channels=args.channels)
    models = build(cfg, args.size, device)
    params = sum(p.numel() for p in models["latentdiff"].parameters())
    torch.manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    c = torch.randn(args.batch, 77, cfg.context_dim or 768, device=device)
    contenders = [Contender(name, m, x, t, c) for name, m in models.items()]
    for k in contenders:  # warm-up: kernels, allocator, AdamW state (resident from here on)
        k.step()
        k.step()
    for _ in range(args.rounds):
        for k in contenders:
            k.time_round(args.steps)
    rate = {k.name: statistics.median(k.rates) for k in contenders}
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    machine = f"{gpu}{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
    lines = [f"# SD v1 UNet training step ({params / 1e6:.1f}M parameters, {args.size}x{args.size}x4 latents, "
             f"batch {args.batch}): latentdiff vs diffusers", "", f"machine: {machine}  ",
             f"command: `python {' '.join(sys.argv)}`  ",
             f"bf16 autocast, fp32 master weights, fused AdamW; median of {args.rounds} interleaved rounds of "
             f"{args.steps} steps", "",
             "| UNet | train img/s | peak extra memory, MiB (activations) |", "| --- | ---: | ---: |"]
    lines += [f"| {k.name} | {rate[k.name]:.2f} | "
              + (f"{k.peak_extra_mib:.0f}" if device.type == "cuda" else "n/a (CPU)") + " |" for k in contenders]
    lines += ["", f"**latentdiff / diffusers: {rate['latentdiff'] / rate['diffusers']:.2f}x** images/s. Both "
              "models, their gradients and AdamW state stay resident throughout "
              + (f"({contenders[-1].resident_mib / 1024:.1f} GiB together); " if device.type == "cuda" else "(CPU: "
                 "no allocator statistics); ")
              + "peak extra is what one step adds on top."]
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}{suffix}.md").write_text(text)
    rows = {k.name: {"train_img_per_s": rate[k.name], "rounds": k.rates, "peak_extra_mib": k.peak_extra_mib}
            for k in contenders}
    (RESULTS / f"{args.out}{suffix}.json").write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv,
                                                                  "params": params}, indent=2))


if __name__ == "__main__":
    main()
