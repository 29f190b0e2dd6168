"""The full-size Stable Diffusion v1 UNet and VAE decoder: latentdiff vs diffusers, same process, same weights.

    python benchmarks/sd_unet.py [--steps 3] [--batch 2] [--decode] [--bf16]

Random weights (none can be downloaded), loaded into both implementations through latentdiff's key map.
UNet: seconds per denoising step on 64x64x4 latents (batch 2 = one classifier-free-guided step), the two
implementations interleaved so that machine noise hits both alike; peak memory is the resident-set high-water
mark (Linux VmHWM, reset before each measurement) above the memory held before the call. Decode: one
512x512 image from a 64x64 latent, whole and in tiles (``--vae-tile``). Writes benchmarks/results/sd_unet.md|json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.formats import sd_configs, sd_keys
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.models.unet import UNet, UNetConfig

RESULTS = Path(__file__).parent / "results"


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory (or its high-water mark, VmHWM) of this process in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_of(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MiB above the resident memory before the call) of one call of ``fn``.

    CPU seconds (this process, all threads) are what the ratio uses: unlike wall time they do not grow
    when other processes share the cores.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0, rss_mib("VmHWM") - before


def build(bf16: bool):
    """latentdiff's SD v1 UNet and diffusers' UNet2DConditionModel holding the same random weights."""
    import diffusers

    torch.manual_seed(0)
    cfg = UNetConfig.sd_v1()
    ours = UNet(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    dcfg = sd_configs.unet_config_to_diffusers(cfg, ours.layout)
    dcfg.pop("_class_name")
    ref = diffusers.UNet2DConditionModel(**dcfg, sample_size=64).eval()
    state = ours.state_dict()
    ref.load_state_dict(sd_keys.unet_to_diffusers(state, sd_keys.unet_key_map(state, ours.layout)), strict=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return ours.to(dtype).requires_grad_(False), ref.to(dtype).requires_grad_(False)


def main() -> None:
    """Run the UNet (and optionally decoder) comparison and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed UNet calls per implementation")
    ap.add_argument("--batch", type=int, default=2, help="2 = one guided step (conditional + unconditional)")
    ap.add_argument("--bf16", action="store_true", help="both UNets in bf16")
    ap.add_argument("--decode", action="store_true", help="also time a 512x512 VAE decode (whole and tiled)")
    ap.add_argument("--vae-tile", type=int, default=32, help="latent tile side for the tiled decode")
    args = ap.parse_args()
    torch.manual_seed(1)
    models = dict(zip(("latentdiff", "diffusers"), build(args.bf16)))
    dtype = next(models["latentdiff"].parameters()).dtype
    x = torch.randn(args.batch, 4, 64, 64, dtype=dtype)
    t = torch.full((args.batch,), 500)
    c = torch.randn(args.batch, 77, 768, dtype=dtype)
    runs = {"latentdiff": lambda: models["latentdiff"](x, t, c),
            "diffusers": lambda: models["diffusers"](x, t, c).sample}
    with torch.inference_mode():
        diff = float((runs["latentdiff"]().float() - runs["diffusers"]().float()).abs().max())  # also warms up
        walls: dict[str, list[float]] = {k: [] for k in runs}
        cpus: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.steps):
            for name, fn in runs.items():
                wall, cpu, peak = peak_of(fn)
                walls[name].append(wall)
                cpus[name].append(cpu)
                peaks[name].append(peak)
                print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak +{peak:.0f} MiB", file=sys.stderr)
    rows = {k: {"s_per_step": statistics.median(walls[k]), "cpu_s_per_step": statistics.median(cpus[k]),
                "peak_mib": max(peaks[k])} for k in runs}
    load = open("/proc/loadavg").read().split()[0]
    result = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"load average {load} at the end",
              "command": "python benchmarks/sd_unet.py " + " ".join(sys.argv[1:]),
              "unet": {"latents": [args.batch, 4, 64, 64], "dtype": str(dtype), "max_abs_diff": diff, **rows,
                       "speed_ratio": rows["diffusers"]["cpu_s_per_step"] / rows["latentdiff"]["cpu_s_per_step"]}}
    models.clear()  # free both UNets before the decode
    if args.decode:
        vae = Autoencoder(AutoencoderConfig.sd()).eval().requires_grad_(False)
        z = torch.randn(1, 4, 64, 64)
        with torch.inference_mode():
            vae.decode_latents(z[:, :, :16, :16])  # warm-up
            whole = peak_of(lambda: vae.decode_latents(z))
            vae.tile = args.vae_tile
            tiles = peak_of(lambda: vae.decode_latents(z))
        result["decode_512"] = {name: {"s": v[0], "cpu_s": v[1], "peak_mib": v[2]}
                                for name, v in (("whole", whole), (f"tiles of {args.vae_tile}", tiles))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd_unet.json").write_text(json.dumps(result, indent=2) + "\n")
    u = result["unet"]
    lines = ["# SD v1 UNet (859.5M parameters, random weights): latentdiff vs diffusers\n",
             f"Machine: {result['machine']}. Command: `{result['command']}`. Same weights in both (max |Δ| of the "
             f"outputs {u['max_abs_diff']:.1e}), calls interleaved, median of {args.steps}; peak = resident-memory "
             "high-water mark above the memory held before the call (weights excluded). CPU seconds are this "
             "process's (both threads): they stay comparable when other work shares the machine, wall seconds "
             "do not.\n",
             "| implementation | CPU s / UNet call | wall s / UNet call | peak extra memory (MiB) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {u[k]['cpu_s_per_step']:.2f} | {u[k]['s_per_step']:.2f} | {u[k]['peak_mib']:.0f} |"
              for k in runs]
    lines.append(f"\nlatentdiff runs at **{u['speed_ratio']:.2f}x** diffusers' speed (CPU time) on {u['latents']} "
                 f"{u['dtype']} latents.")
    if "decode_512" in result:
        lines += ["\n## 512x512 VAE decode (SD VAE, random weights)\n",
                  "| mode | CPU s | wall s | peak extra memory (MiB) |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['cpu_s']:.1f} | {v['s']:.1f} | {v['peak_mib']:.0f} |"
                  for k, v in result["decode_512"].items()]
    (RESULTS / "sd_unet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
