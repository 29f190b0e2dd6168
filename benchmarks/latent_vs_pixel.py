"""Latent vs pixel diffusion on Fashion-MNIST at equal training time, with the same UNet in both.

    python benchmarks/latent_vs_pixel.py --minutes 6 --ae-minutes 5 --n-eval 500

Trains the autoencoder (ae-fashion), then latent diffusion (ldm-fashion) and pixel diffusion
(pixel-fashion) for the same wall-clock budget, and reports in one run on one machine: training
images/s, seconds per sample at 50 DDIM steps (decode included), peak memory of sampling (a fresh
process per model: peak RSS growth while sampling on the CPU, torch's peak allocation on CUDA), and
FID / CMMD / precision / recall with the shipped Fashion-MNIST domain features against held-out images.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training.config import load_config
from latentdiff.training import make_trainer

RESULTS = Path(__file__).parent / "results"
UNET = ["unet.model_channels=32", "unet.channel_mult=[1,2,2]", "unet.num_res_blocks=1",
        "unet.attention_resolutions=[2,4]", "unet.num_heads=4"]
DIFFUSION_TRAIN = ["train.steps=1000000", "train.lr_schedule=constant", "train.lr=5.0e-4", "train.batch_size=64",
                   "train.checkpoint_every=0", "train.grid_samples=64", "train.log_every=50", "train.threads=2"]

# Runs in a fresh interpreter so that its peak memory is its own.
SAMPLER_PROBE = r"""
import json, sys, time, torch
from latentdiff.pipelines.generate import Pipeline
path, n, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
pipe = Pipeline.load(path, device)
pipe.generate(2, 2, 2)  # warm-up


def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (Linux)
base = rss_kb()
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
pipe.generate(n, n, 50, "ddim", 0)
dt = time.perf_counter() - t0
peak = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else (rss_kb() - base) / 1024
print(json.dumps({"seconds_per_image": dt / n, "peak_sampling_mib": peak}))
"""


def train(preset: str, out: Path, minutes: float, extra: list[str]) -> float:
    """Train a preset for a time budget; return the mean training images/s (first log row skipped)."""
    cfg = load_config(preset, extra + [f"train.time_limit={minutes}"])
    make_trainer(cfg, out, progress=False).run()
    with open(out / "metrics.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)][1:]
    return sum(rates) / max(len(rates), 1)


def probe(model: Path, n: int, device: str) -> dict:
    """Sampling speed and memory of one model folder, in a fresh process."""
    r = subprocess.run([sys.executable, "-c", SAMPLER_PROBE, str(model), str(n), device], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget of each diffusion model")
    ap.add_argument("--ae-minutes", type=float, default=5.0, help="training budget of the autoencoder")
    ap.add_argument("--ae", type=Path, default=None, help="reuse a trained autoencoder folder")
    ap.add_argument("--n-eval", type=int, default=500, help="samples for FID etc. (and held-out real images)")
    ap.add_argument("--n-probe", type=int, default=64, help="batch for the speed / memory probe")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-latent-vs-pixel"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from latentdiff.pipelines.evaluate import evaluate_reconstruction, evaluate_samples

    work = args.work
    t_start = time.perf_counter()
    ae = args.ae or work / "ae"
    if args.ae is None:
        train("ae-fashion", ae, args.ae_minutes, ["train.steps=1000000", "train.checkpoint_every=0",
                                                 "ae_loss.disc_start=1500", "train.threads=2"])
    recon = evaluate_reconstruction(ae, args.n_eval)
    rows = {}
    for name, preset, extra in (("latent (LDM, f=4)", "ldm-fashion", [f"latent.autoencoder={ae}", "unet.in_channels=4",
                                                                       "unet.out_channels=4"]),
                                ("pixel (DDPM)", "pixel-fashion", ["unet.in_channels=1", "unet.out_channels=1"])):
        out = work / preset
        rate = train(preset, out, args.minutes, UNET + DIFFUSION_TRAIN + extra)
        quality = evaluate_samples(out, args.n_eval, batch_size=100, steps=50)
        steps = json.loads((out / "model_index.json").read_text())["step"]
        rows[name] = {"train_images_per_s": rate, "train_steps": steps, **probe(out, args.n_probe, args.device),
                      **{k: quality[k] for k in ("fid", "cmmd", "precision", "recall")}}
    lat, pix = rows["latent (LDM, f=4)"], rows["pixel (DDPM)"]
    machine = (f"{cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"device {args.device}")
    lines = [f"# Latent vs pixel diffusion, Fashion-MNIST 32x32, {args.minutes} min of training each", "",
             f"machine: {machine}  ", f"command: `python {' '.join(sys.argv)}`  ",
             f"total wall time: {(time.perf_counter() - t_start) / 60:.1f} min  ",
             f"autoencoder: {args.ae_minutes} min, held-out PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}, "
             f"rFID {recon.get('rfid', float('nan')):.2f} (domain features)", "",
             "| model | train img/s | steps | s/sample (DDIM 50) | peak sampling MiB | FID | CMMD | precision "
             "| recall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['train_images_per_s']:.0f} | {r['train_steps']} | {r['seconds_per_image']:.4f} | "
                     f"{r['peak_sampling_mib']:.0f} | {r['fid']:.1f} | {r['cmmd']:.3f} | {r['precision']:.2f} | "
                     f"{r['recall']:.2f} |")
    lines += ["", "ratios (latent / pixel): training throughput "
              f"{lat['train_images_per_s'] / pix['train_images_per_s']:.1f}x, "
              f"sampling {pix['seconds_per_image'] / lat['seconds_per_image']:.1f}x faster, "
              f"sampling memory {lat['peak_sampling_mib'] / max(pix['peak_sampling_mib'], 1e-9):.2f}x, "
              f"FID {lat['fid'] / pix['fid']:.2f}x",
              "", f"FID etc. use {args.n_eval} samples vs {args.n_eval} held-out test images with the shipped "
              "Fashion-MNIST classifier's 128-d features (not Inception: no weights can be downloaded here); "
              "compare FIDs only at equal n."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent_vs_pixel.md").write_text(text)
    (RESULTS / "latent_vs_pixel.json").write_text(json.dumps({"rows": rows, "autoencoder": recon, "argv": sys.argv,
                                                              "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
