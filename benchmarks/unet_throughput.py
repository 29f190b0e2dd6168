"""Training throughput and sampling time of latentdiff's UNet vs diffusers' UNet2DModel, same process.

    python benchmarks/unet_throughput.py [--preset mnist] [--batch 64] [--iters 5] [--rounds 5] [--device cuda]

Both networks get the same widths, depths, GroupNorm groups and attention placement. Contenders:
latentdiff as its trainer runs it (``train.precision=auto``: bf16 autocast on a CPU with bf16 units or a
GPU, training/step.py) and in the other precision, the same with ``unet.attention_block=plain``
(UNet2DModel's own architecture), diffusers as the plain script runs it (fp32) and under bf16 autocast.
Training is forward + backward + fused AdamW, timed in ``--rounds`` interleaved rounds of ``--iters``
steps (a load that comes and goes hits every contender alike; the median round counts); sampling is 50
DDIM steps in fp32. Latent presets (ldm-*) train on random latents of ``--size`` (default: the
autoencoder's 4x smaller side). On CUDA every timing waits for the device (torch.cuda.synchronize).
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
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.diffusion import Schedule, diffusion_loss, sample
from latentdiff.models.unet import UNet
from latentdiff.training.config import load_config
from latentdiff.training.step import auto_precision


def diffusers_peer(cfg):
    """diffusers' UNet2DModel with the same channel plan and groups (attention at the same levels, plus mid)."""
    from diffusers import UNet2DModel

    levels = len(cfg.channel_mult)
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    return UNet2DModel(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=cfg.model_channels * cfg.channel_mult[-1] // cfg.num_heads,
        norm_num_groups=cfg.norm_groups)


def wrap(model, is_diffusers):
    if is_diffusers:
        return lambda x, t: model(x, t).sample
    return lambda x, t: model(x, t)


def sync(device: torch.device) -> None:
    """Wait for the device: CUDA runs ahead of the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One network, its optimiser and its precision; ``step`` is one training step."""

    def __init__(self, name: str, model, is_diffusers: bool, precision: str, x, schedule):
        self.name, self.model, self.precision, self.x = name, model, precision, x
        self.key = f"{name}, {precision}"  # what the ratios look rows up by
        self.fn = wrap(model, is_diffusers)
        self.opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=x.device.type in ("cpu", "cuda"))
        self.schedule = schedule.to(x.device)  # t, ε and the schedule on the device: no host round trip per step
        self.times: list[float] = []

    def step(self) -> None:
        x = self.x
        t = torch.randint(0, self.schedule.num_timesteps, (x.shape[0],), device=x.device)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            loss = diffusion_loss(self.fn, x, self.schedule, t=t, eps=torch.randn_like(x))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def time_round(self, iters: int) -> None:
        sync(self.x.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step()
        sync(self.x.device)
        self.times.append(self.x.shape[0] * iters / (time.perf_counter() - t0))


def sample_time(fn, x, schedule, steps=50):
    sync(x.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        sample(fn, x, schedule, "ddim", steps)
    sync(x.device)
    return (time.perf_counter() - t0) / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5, help="training steps per contender and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=0, help="side of the trained tensors (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the machine's name goes into the results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.preset)
    ucfg = cfg.unet
    ucfg.norm_groups = min(8, ucfg.model_channels)  # the peer's groups: identical networks but for attention
    latent = args.preset.startswith("ldm")
    size = args.size or (cfg.data.image_size // 4 if latent else cfg.data.image_size)
    schedule = Schedule.from_name(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    torch.manual_seed(0)
    x = torch.randn(args.batch, ucfg.in_channels, size, size).to(device)
    auto = auto_precision(device)
    plain = dataclasses.replace(ucfg, attention_block="plain")  # UNet2DModel's own architecture
    is_plain = ucfg.attention_block == "plain"  # the preset already is: its rows serve as the plain ones
    other = "fp32" if auto == "bf16" else "bf16"
    plan = [("latentdiff", False, auto), ("latentdiff", False, other)]
    plan += [] if is_plain else [("latentdiff plain", False, auto), ("latentdiff plain", False, other)]
    contenders = []
    for name, is_diffusers, precision in plan + [("diffusers", True, "fp32"), ("diffusers", True, "bf16")]:
        torch.manual_seed(0)
        model = diffusers_peer(ucfg) if is_diffusers else UNet(plain if "plain" in name else ucfg)
        contenders.append(Contender(name, model.to(device), is_diffusers, precision, x, schedule))
    for c in contenders:  # warm-up: allocations, oneDNN primitives
        for _ in range(3):
            c.step()
    for _ in range(args.rounds):
        for c in contenders:
            c.time_round(args.iters)
    rows, samples = [], {}
    for c in contenders:
        if c.name not in samples:  # sampling in fp32, as both pipelines sample by default
            samples[c.name] = sample_time(c.fn, x[:16], c.schedule)
        auto_mark = " (train.precision=auto)" if c.name != "diffusers" and c.precision == auto else ""
        rows.append({"model": c.key + auto_mark, "params": sum(p.numel() for p in c.model.parameters()),
                     "train_img_per_s": statistics.median(c.times), "rounds_img_per_s": c.times,
                     "sample_s_per_img_ddim50": samples[c.name]})
    rate = {c.key: statistics.median(c.times) for c in contenders}
    if is_plain:
        rate |= {f"latentdiff plain, {p}": rate[f"latentdiff, {p}"] for p in ("fp32", "bf16")}
        samples["latentdiff plain"] = samples["latentdiff"]
    product, peer = rate[f"latentdiff, {auto}"], rate["diffusers, fp32"]
    same = {p: rate[f"latentdiff, {p}"] / rate[f"diffusers, {p}"] for p in ("fp32", "bf16")}
    same_plain = {p: rate[f"latentdiff plain, {p}"] / rate[f"diffusers, {p}"] for p in ("fp32", "bf16")}
    machine = (f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "") + \
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
    shape = f"{size}x{size}x{ucfg.in_channels}"
    lines = [f"# UNet training throughput, preset `{args.preset}` ({shape}), batch {args.batch}", "",
             f"machine: {machine}  ", f"command: `python {' '.join(sys.argv)}`  ",
             f"median of {args.rounds} interleaved rounds of {args.iters} steps", "",
             "| model, precision | params | train img/s | sampling s/img (DDIM 50, fp32) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['train_img_per_s']:.1f} | {r['sample_s_per_img_ddim50']:.3f} |"
              for r in rows]
    lines += ["", f"**latentdiff as it trains ({auto}) / diffusers as the plain script runs it (fp32): "
              f"{product / peer:.2f}x** images/s (with `unet.attention_block=plain`, UNet2DModel's architecture: "
              f"{rate[f'latentdiff plain, {auto}'] / peer:.2f}x); at equal precision: fp32 {same['fp32']:.2f}x "
              f"(plain {same_plain['fp32']:.2f}x), bf16 {same['bf16']:.2f}x (plain {same_plain['bf16']:.2f}x); "
              f"sampling {samples['diffusers'] / samples['latentdiff']:.2f}x faster (plain "
              f"{samples['diffusers'] / samples['latentdiff plain']:.2f}x)", "",
              "Same widths, depths, GroupNorm groups and attention levels. `latentdiff` is the preset as it "
              "trains: " + ("one plain attention per block (`unet.attention_block: plain`), so the plain figures "
                            "are its own rows; " if is_plain else
                            "Stable Diffusion's transformer block (self-attention, cross-attention slot, GEGLU "
                            "feed-forward) where UNet2DModel has one plain attention, hence more parameters and "
                            "work; `latentdiff plain` sets `unet.attention_block=plain`; ") +
              "plain attention is UNet2DModel's network (its weights load by name, tests/test_unet.py). "
              "latentdiff's attention scores run in fp32 under bf16 autocast on a CPU (nn/attention.py: torch's "
              "bf16 attention backward is slower there)."]
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = Path(__file__).parent / "results" / f"unet_throughput_{args.preset}{suffix}.md"
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
