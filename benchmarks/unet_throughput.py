"""Training throughput and sampling time of latentdiff's UNet vs diffusers' UNet2DModel, same process.

    python benchmarks/unet_throughput.py [--preset mnist] [--batch 64] [--iters 20] [--bf16] [--device cuda]

Both networks get the same widths, depths and attention placement; the table reports forward+backward
images/s (AdamW step included, fused on CPU and CUDA as the trainers use it) and seconds per image for
50 DDIM steps, and the ratio. On CUDA every timing waits for the device (torch.cuda.synchronize).
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
from latentdiff.diffusion import Schedule, diffusion_loss, sample
from latentdiff.models.unet import UNet




def diffusers_peer(cfg):
    """diffusers' UNet2DModel with the same channel plan (attention at the same levels, plus mid)."""
    from diffusers import UNet2DModel

    levels = len(cfg.channel_mult)
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    return UNet2DModel(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=cfg.model_channels * cfg.channel_mult[-1] // cfg.num_heads,
        norm_num_groups=min(8, cfg.model_channels))


def wrap(model, is_diffusers):
    if is_diffusers:
        return lambda x, t: model(x, t).sample
    return lambda x, t: model(x, t)


def sync(device: torch.device) -> None:
    """Wait for the device: CUDA runs ahead of the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(fn, model, x, schedule, iters, bf16):
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=x.device.type in ("cpu", "cuda"))

    on_device = schedule.to(x.device)  # t, ε and the schedule on the device: no host round trip per step

    def step():
        t = torch.randint(0, schedule.num_timesteps, (x.shape[0],), device=x.device)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(fn, x, on_device, t=t, eps=torch.randn_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(x.device)
    return x.shape[0] * iters / (time.perf_counter() - t0)


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
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the machine's name goes into the results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.preset)
    size, ch = cfg.data.image_size, cfg.data.channels
    schedule = Schedule.from_name(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    torch.manual_seed(0)
    x = torch.randn(args.batch, ch, size, size).to(device)
    rows = []
    for name in ("latentdiff", "diffusers"):
        torch.manual_seed(0)
        model = (UNet(cfg.unet) if name == "latentdiff" else diffusers_peer(cfg.unet)).to(device)
        fn = wrap(model, name == "diffusers")
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "train_img_per_s": train_rate(fn, model, x, schedule, args.iters, args.bf16),
                     "sample_s_per_img_ddim50": sample_time(fn, x[:16], schedule)})
    ratio = rows[0]["train_img_per_s"] / rows[1]["train_img_per_s"]
    sratio = rows[1]["sample_s_per_img_ddim50"] / rows[0]["sample_s_per_img_ddim50"]
    machine = (f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "") + \
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
    lines = [f"# UNet throughput, preset `{args.preset}` ({size}x{size}x{ch}), batch {args.batch}, "
             f"{'bf16 autocast' if args.bf16 else 'fp32'}", "",
             f"machine: {machine}  ", f"command: `python {' '.join(sys.argv)}`", "",
             "| model | params | train img/s | sampling s/img (DDIM 50) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['train_img_per_s']:.1f} | {r['sample_s_per_img_ddim50']:.3f} |"
              for r in rows]
    lines += ["", f"latentdiff / diffusers: training {ratio:.2f}x, sampling {sratio:.2f}x faster", "",
              "Same widths, depths and attention levels; the parameter counts differ because latentdiff's "
              "attention is Stable Diffusion's transformer block (self-attention, cross-attention slot, GEGLU "
              "feed-forward) where UNet2DModel has a plain attention block."]
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = ("_bf16" if args.bf16 else "") + ("" if device.type == "cpu" else f"_{device.type}")
    out = Path(__file__).parent / "results" / f"unet_throughput_{args.preset}{suffix}.md"
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
