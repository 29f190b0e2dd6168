"""The full-size Stable Diffusion v1 UNet and VAE decoder: latentdiff vs diffusers, same process, same weights.

    python benchmarks/sd_unet.py [--device cpu|cuda] [--precision fp32 bf16] [--ref-precision fp32]
                                 [--steps 3] [--batch 2] [--decode]

Random weights (none can be downloaded), loaded into both implementations through latentdiff's key map.
UNet: seconds per denoising step on 64x64x4 latents (batch 2 = one classifier-free-guided step), latentdiff in
each ``--precision`` (its weights cast as ``Pipeline.configure(precision=...)`` casts them, inputs cast as the
sampler casts them) against diffusers in ``--ref-precision``, all calls interleaved so that machine noise hits
them alike. Error: each latentdiff output against diffusers' (max |Δ| and relative RMS ||Δ|| / ||ref||).
CPU: the ratio uses this process's CPU seconds (they do not grow when other processes share the cores); peak
memory is the resident-set high-water mark (Linux VmHWM, reset before each call) above the memory held before.
CUDA: wall seconds with synchronisation, peak = allocated-memory high-water mark above the memory held before.
Decode: one 512x512 image from a 64x64 latent, whole and in tiles (``--vae-tile``; CPU only). Writes
benchmarks/results/sd_unet.md|json (``--out NAME`` for another name).
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory (or its high-water mark, VmHWM) of this process in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_of(fn, device: torch.device) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MiB above the memory held before the call) of one call of ``fn``.

    CPU seconds (this process, all threads) are what the CPU ratio uses: unlike wall time they do not grow
    when other processes share the cores. On CUDA the peak is the allocator's, the CPU seconds mean little.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss_mib("VmHWM")
    return time.perf_counter() - t0, time.process_time() - c0, peak - before


def paired_unets(cfg: UNetConfig, sample_size: int = 64) -> tuple[UNet, torch.nn.Module]:
    """latentdiff's UNet of ``cfg`` with random weights and diffusers' UNet2DConditionModel holding the same ones
    (through latentdiff's key map), both fp32 on the CPU."""
    import diffusers

    torch.manual_seed(0)
    ours = UNet(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    dcfg = sd_configs.unet_config_to_diffusers(cfg, ours.layout)
    dcfg.pop("_class_name")
    ref = diffusers.UNet2DConditionModel(**dcfg, sample_size=sample_size)
    state = ours.state_dict()
    ref.load_state_dict(sd_keys.unet_to_diffusers(state, sd_keys.unet_key_map(state, ours.layout)), strict=True)
    return ours, ref


def build(precisions: list[str], ref_precision: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """diffusers' UNet2DConditionModel and latentdiff's SD v1 UNet in each precision, same random weights."""
    cfg = UNetConfig.sd_v1()
    ours, ref = paired_unets(cfg)
    ours.eval().requires_grad_(False)
    ref.eval().requires_grad_(False)
    models = {f"diffusers {ref_precision}": ref.to(device, DTYPES[ref_precision])}
    for p in precisions:  # other precisions built narrow and filled by cast: no second fp32 copy at any time
        models[f"latentdiff {p}"] = narrow_copy(ours, cfg, DTYPES[p]).to(device)
    if "fp32" in precisions:
        models["latentdiff fp32"] = ours.to(device)
    return models


def narrow_copy(ours: UNet, cfg: UNetConfig, dtype: torch.dtype) -> UNet:
    """``ours`` itself for fp32, else a copy made directly in ``dtype`` (the weights cast as configure casts them)."""
    if dtype == torch.float32:
        return ours
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        m = UNet(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    m.load_state_dict(ours.state_dict())
    return m


def unet_rows(args: argparse.Namespace, device: torch.device) -> dict:
    """Time every model interleaved; error of each latentdiff output against diffusers'."""
    models = build(args.precision, args.ref_precision, device)
    ref_name = next(iter(models))
    torch.manual_seed(1)
    x = torch.randn(args.batch, 4, 64, 64, device=device)
    t = torch.full((args.batch,), 500, device=device)
    c = torch.randn(args.batch, 77, 768, device=device)

    def call(name: str, m: torch.nn.Module):
        dt = next(m.parameters()).dtype  # inputs cast as the sampler casts them (models/sampling.py)
        if name == ref_name:
            return lambda: m(x.to(dt), t, c.to(dt)).sample.float()
        return lambda: m(x.to(dt), t, c.to(dt)).float()

    runs = {name: call(name, m) for name, m in models.items()}
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        ref_out = runs[ref_name]()  # the first calls also warm up
        for name, fn in runs.items():
            if name != ref_name:
                d = fn() - ref_out
                rows[name] = {"max_abs_diff": float(d.abs().max()), "rel_rms_diff": float(d.norm() / ref_out.norm())}
        ref_std = float(ref_out.std())
        del ref_out
        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        for _ in range(args.steps):
            for name, fn in runs.items():
                samples[name].append(peak_of(fn, device))
                w, cpu, peak = samples[name][-1]
                print(f"{name}: {w:.3f} s wall, {cpu:.2f} s CPU, peak +{peak:.0f} MiB", file=sys.stderr)
    clock = 0 if device.type == "cuda" else 1  # what the ratio uses: wall on CUDA, CPU seconds on CPU
    for name, s in samples.items():
        rows.setdefault(name, {}).update(s_per_step=statistics.median(v[0] for v in s),
                                         cpu_s_per_step=statistics.median(v[1] for v in s),
                                         peak_mib=max(v[2] for v in s))
    base = statistics.median(v[clock] for v in samples[ref_name])
    for name in runs:
        if name != ref_name:
            rows[name]["time_vs_ref"] = statistics.median(v[clock] for v in samples[name]) / base
    models.clear()
    return {"latents": [args.batch, 4, 64, 64], "reference": ref_name, "ref_output_std": ref_std,
            "clock": "wall" if clock == 0 else "CPU", "rows": rows}


def decode_rows(tile: int) -> dict:
    """Seconds and peak memory of one 512x512 decode (fp32 VAE, as the pipeline keeps it), whole and tiled."""
    cpu = torch.device("cpu")
    vae = Autoencoder(AutoencoderConfig.sd()).eval().requires_grad_(False)
    z = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        vae.decode_latents(z[:, :, :16, :16])  # warm-up
        whole = peak_of(lambda: vae.decode_latents(z), cpu)
        vae.tile = tile
        tiles = peak_of(lambda: vae.decode_latents(z), cpu)
    return {name: {"s": v[0], "cpu_s": v[1], "peak_mib": v[2]}
            for name, v in (("whole", whole), (f"tiles of {tile}", tiles))}


def markdown(result: dict, steps: int) -> list[str]:
    """The results page."""
    u = result["unet"]
    lines = ["# SD v1 UNet (859.5M parameters, random weights): latentdiff vs diffusers\n",
             (f"Machine: {result['machine']}. Command: `{result['command']}`. Same weights in every model, calls "
             f"interleaved, median of {steps}; the ratio is {u['clock']} seconds per call over {u['reference']}'s. "
             "Error: the output against diffusers' on the same input (output std "
             f"{u['ref_output_std']:.2f}). Peak = memory high-water mark above the memory held before the call "
             "(weights excluded). CPU seconds are this process's (all threads): they stay comparable when other work "
             "shares the machine, wall seconds do not.\n"),
             (f"| implementation | CPU s / UNet call | wall s / UNet call | time vs {u['reference']} | max abs error "
              "| relative RMS error | peak extra memory (MiB) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in u["rows"].items():
        ratio = f"**{r['time_vs_ref']:.2f}x**" if "time_vs_ref" in r else "1"
        err = (f"{r['max_abs_diff']:.1e} | {r['rel_rms_diff']:.1e}" if "max_abs_diff" in r else "reference | reference")
        lines.append(f"| {k} | {r['cpu_s_per_step']:.2f} | {r['s_per_step']:.3f} | {ratio} | {err} "
                     f"| {r['peak_mib']:.0f} |")
    if "decode_512" in result:
        lines += ["\n## 512x512 VAE decode (SD VAE, random weights, fp32)\n",
                  "| mode | CPU s | wall s | peak extra memory (MiB) |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['cpu_s']:.1f} | {v['s']:.1f} | {v['peak_mib']:.0f} |"
                  for k, v in result["decode_512"].items()]
    return lines


def main() -> None:
    """Run the UNet (and optionally decoder) comparison and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: wall-clock ratio; unmeasured so far)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                    help="latentdiff's precisions, each timed (fp16: CUDA only)")
    ap.add_argument("--ref-precision", default="fp32", choices=list(DTYPES), help="diffusers' precision")
    ap.add_argument("--steps", type=int, default=3, help="timed UNet calls per model")
    ap.add_argument("--batch", type=int, default=2, help="2 = one guided step (conditional + unconditional)")
    ap.add_argument("--decode", action="store_true", help="also time a 512x512 VAE decode (whole and tiled)")
    ap.add_argument("--vae-tile", type=int, default=32, help="latent tile side for the tiled decode")
    ap.add_argument("--out", default="sd_unet", help="results file name in benchmarks/results/ (no suffix)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and "fp16" in args.precision + [args.ref_precision]:
        ap.error("fp16 is for CUDA: CPU kernels in fp16 are slow and latentdiff's pipeline offers fp32 and bf16")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    result = {"machine": "", "command": "python benchmarks/sd_unet.py " + " ".join(sys.argv[1:]),
              "unet": unet_rows(args, device)}
    if args.decode and device.type == "cpu":
        result["decode_512"] = decode_rows(args.vae_tile)
    load = Path("/proc/loadavg").read_text().split()[0]
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    result["machine"] = (f"{cpu_name()}{gpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"load average {load} at the end")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = markdown(result, args.steps)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
