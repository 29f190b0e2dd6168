"""Time to quality on Fashion-MNIST 32x32: the project's one-command recipe against the plainest peer,
the same device and the same wall-clock budget, everything included.

    python benchmarks/time_to_quality.py --device cpu --minutes 10 [--threads 2] [--n-eval 2000]
    python benchmarks/time_to_quality.py --device cuda --minutes 3

Contenders (``--contenders``, run one after the other, each in a fresh process whose whole wall time —
interpreter start, imports, data loading, the latent encoding, saving — is the budget):

- ``latentdiff``: ``latentdiff train fashion --minutes N`` (``--recipe``: another recipe), the recommended
  recipe: autoencoder then latent diffusion, planned to the budget (training/plan.py);
- ``pixel``: ``latentdiff train pixel-fashion --minutes N``, the project's pixel-space UNet, planned;
- ``diffusers``: the 40-line script a user would otherwise write (``PEER`` below): diffusers'
  ``UNet2DModel`` with block_out_channels 32/64/64, one layer per block, attention only at 8x8, on
  32x32 pixels, batch 64, AdamW 3e-4, EMA 0.999, DDPM ε loss, trained until the budget is spent.

Sampling is timed separately, after the budget: DDIM with 50 steps (the project's ``Pipeline``; the
peer's ``DDIMScheduler``), ``--n-eval`` images, then FID / precision / recall in the shipped
Fashion-MNIST classifier's features against as many test-split images (eval/, as
benchmarks/latent_vs_pixel.py). Writes benchmarks/results/time_to_quality_<device>[_<tag>].{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

RESULTS = Path(__file__).parent / "results"

# The peer: what a user writes with diffusers in ~40 lines. Run as its own process (argv: out minutes device
# threads); its budget counts from the process start, as the project's does.
PEER = r'''
import copy, json, os, sys, time
t_process = time.perf_counter() - (float(open("/proc/uptime").read().split()[0])
                                   - int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK"))
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from latentdiff.data import DataConfig, load_dataset
out, minutes, device, threads = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
images = load_dataset(DataConfig(source="fashion-mnist", image_size=32, channels=1)).images.to(device)
model = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8).to(device)
ema = copy.deepcopy(model).requires_grad_(False)
scheduler = DDPMScheduler(num_train_timesteps=1000)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
deadline, steps = t_process + 60 * minutes - 2.0, 0  # 2 s to save
t_train = time.perf_counter()
while time.perf_counter() < deadline:
    x = images[torch.randint(0, len(images), (64,), device=device)].float() / 127.5 - 1
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (64,), device=device)
    loss = F.mse_loss(model(scheduler.add_noise(x, noise, t), t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - 0.999)
    steps += 1
seconds = time.perf_counter() - t_train
ema.save_pretrained(out)
json.dump({"steps": steps, "images": 64 * steps, "train_seconds": seconds}, open(os.path.join(out, "peer.json"), "w"))
'''


def run_timed(cmd: list[str], log: Path) -> float:
    """Run a contender's command; its wall seconds (failure: stop with its log's tail)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


@torch.no_grad()
def sample_peer(folder: Path, n: int, batch: int, device: str) -> torch.Tensor:
    """n uint8 images from the peer's EMA UNet with diffusers' DDIM, 50 steps, seeds per batch."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    model = UNet2DModel.from_pretrained(folder).to(device).eval()
    ddim = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    ddim.set_timesteps(50)
    out = []
    for i in range(0, n, batch):
        x = torch.randn(min(batch, n - i), 1, 32, 32, generator=torch.Generator().manual_seed(i)).to(device)
        for t in ddim.timesteps:
            x = ddim.step(model(x, t).sample, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def train_rate(run_dir: Path) -> float:
    """Mean images/s of a latentdiff run's metrics.csv (the first row, with the calibration, left out)."""
    with open(run_dir / "metrics.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)]
    return sum(rates[1:]) / max(len(rates) - 1, 1) if len(rates) > 1 else (rates[0] if rates else float("nan"))


def main() -> None:
    """Train every contender on the same budget, sample, score; write the results file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each contender")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (CPU)")
    ap.add_argument("--n-eval", type=int, default=2000, help="generated and test images for FID etc.")
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--contenders", default="latentdiff,diffusers", help="comma-separated: latentdiff, pixel, diffusers")
    ap.add_argument("--recipe", default="fashion", help="the latentdiff contender's recipe (name or YAML)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--extra", nargs="*", default=[], help="section.key=value overrides for the latentdiff contenders "
                    "(e.g. data.limit=4096 for a smoke test)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-time-to-quality"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from latentdiff.data import DataConfig, load_dataset
    from latentdiff.eval.features import build_extractor
    from latentdiff.eval.report import evaluate
    from latentdiff.pipelines.generate import Pipeline

    real = load_dataset(DataConfig(source="fashion-mnist", image_size=32, channels=1, split="test",
                                   limit=args.n_eval)).images
    extractor = build_extractor("domain:fashion-mnist", device=args.device)
    load0 = os.getloadavg()[0]
    rows = {}
    for name in args.contenders.split(","):
        out = args.work / f"{name}-{args.device}-{args.minutes:g}min{'-' + args.tag if args.tag else ''}"
        if out.exists():
            sys.exit(f"{out} exists: remove it or give another --work / --tag")
        out.mkdir(parents=True)
        ld = [sys.executable, "-m", "latentdiff", "train"]
        common = ["--minutes", str(args.minutes), "--device", args.device, f"train.threads={args.threads}", *args.extra]
        if name == "latentdiff":
            wall = run_timed(ld + [args.recipe, "--out", str(out)] + common, out / "train.log")
            recipe = json.loads((out / "recipe.json").read_text())["stages"]
            model, info = out / list(recipe)[-1], {"stages": {k: v["steps"] for k, v in recipe.items()}}
            info["train_images_per_s"] = train_rate(model)
        elif name == "pixel":
            wall = run_timed(ld + ["pixel-fashion", "--out", str(out)] + common, out / "train.log")
            model = out
            info = {"stages": {"pixel": json.loads((out / "model_index.json").read_text())["step"]},
                    "train_images_per_s": train_rate(out)}
        elif name == "diffusers":
            wall = run_timed([sys.executable, "-c", PEER, str(out), str(args.minutes), args.device, str(args.threads)],
                             out / "train.log")
            model, peer = out, json.loads((out / "peer.json").read_text())
            info = {"stages": {"unet": peer["steps"]}, "train_images_per_s": peer["images"] / peer["train_seconds"]}
        else:
            sys.exit(f"unknown contender {name!r}")
        t = time.perf_counter()
        if name == "diffusers":
            fake = sample_peer(model, args.n_eval, args.sample_batch, args.device)
        else:
            fake = Pipeline.load(model, args.device).generate(args.n_eval, args.sample_batch, 50, "ddim", seed=0)
        per_sample = (time.perf_counter() - t) / args.n_eval
        q = evaluate(real, fake, extractor)
        rows[name] = {"wall_seconds": wall, **info, "seconds_per_sample": per_sample,
                      **{k: q[k] for k in ("fid", "precision", "recall")}}
        print(name, json.dumps(rows[name]), flush=True)
    write(args, rows, load0)


def write(args: argparse.Namespace, rows: dict, load0: float) -> None:
    """The results table (and JSON) with the machine and the command."""
    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {args.threads} threads, torch "
               f"{torch.__version__}, device {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    lines = [f"# Time to quality, Fashion-MNIST 32x32, {args.minutes:g} min wall each, {args.device}", "",
             f"machine: {machine}  ", f"command: `python {' '.join(sys.argv)}`  ",
             f"load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} (other processes on the machine)",
             "", "| contender | wall s (budget incl.) | steps | train img/s | s/sample (DDIM 50) | FID | precision | recall |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        steps = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
        lines.append(f"| {name} | {r['wall_seconds']:.0f} | {steps} | {r['train_images_per_s']:.0f} | "
                     f"{r['seconds_per_sample']:.4f} | {r['fid']:.1f} | {r['precision']:.2f} | {r['recall']:.2f} |")
    if "latentdiff" in rows and "diffusers" in rows:
        a, b = rows["latentdiff"], rows["diffusers"]
        lines += ["", f"latentdiff / diffusers: FID {a['fid'] / b['fid']:.2f}x, sampling "
                  f"{b['seconds_per_sample'] / a['seconds_per_sample']:.1f}x faster"]
    lines += ["", f"FID / precision / recall: {args.n_eval} DDIM-50 samples against {args.n_eval} test-split images in "
              "the shipped Fashion-MNIST classifier's features (not Inception: compare only at equal n). "
              "Train img/s: the diffusion stage's mean (latentdiff: metrics.csv without its first row)."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"time_to_quality_{args.device.split(':')[0]}{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv,
                                                     "minutes": args.minutes, "n_eval": args.n_eval}, indent=2))


if __name__ == "__main__":
    main()
