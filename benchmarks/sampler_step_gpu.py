"""Per-step time and host syncs of the samplers on a GPU: this tree against a peer checkout, same process order.

    python benchmarks/sampler_step_gpu.py --peer PATH/TO/OTHER/src     (needs CUDA)

For each sampler, in a child process per code base (PYTHONPATH = that src): the number of synchronising
CUDA calls during `sample(...)` at 10 and 20 steps (torch.cuda.set_sync_debug_mode("warn"), counted
warnings), and milliseconds per step at 20 steps (median of 5 runs after a warm-up) with two denoisers
on (4, 4, 64, 64) latents: a pointwise one (launch-bound: host syncs show) and a latentdiff UNet
(128 channels, mult 1-2-4, attention at 1/2 and 1/4, random weights). Writes
benchmarks/results/sampler_step_gpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["euler", "dpmpp_2m", "dpmpp_2m_sde", "lms", "heun", "unipc", "deis"]


def child(samplers: list[str]) -> None:
    import torch

    from latentdiff.diffusion import SAMPLERS as HAVE
    from latentdiff.diffusion import Schedule, sample
    from latentdiff.models.unet import UNet, UNetConfig

    dev = torch.device("cuda")
    schedule = Schedule.from_name("scaled_linear")
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=128, channel_mult=(1, 2, 4),
                           num_res_blocks=2, attention_resolutions=(2, 4), num_head_channels=64)).to(dev).eval()
    models = {"pointwise": lambda z, t: torch.tanh(z) * 0.5, "unet": lambda z, t: unet(z, t)}
    noise = torch.randn(4, 4, 64, 64, device=dev)
    out = []
    for name in samplers:
        if name not in HAVE:
            continue
        row = {"sampler": name}
        for label, fn in models.items():
            def go(steps: int) -> None:
                sample(fn, noise, schedule, name, steps, generator=torch.Generator().manual_seed(0), spacing="karras")
            with torch.no_grad():
                go(20)
                torch.cuda.synchronize()
                for steps in (10, 20):
                    torch.cuda.set_sync_debug_mode("warn")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        go(steps)
                    torch.cuda.set_sync_debug_mode("default")
                    row[f"{label}_syncs_{steps}"] = sum("synchroniz" in str(w.message) for w in caught)
                times = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    go(20)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / 20 * 1000)
                row[f"{label}_ms_per_step"] = round(sorted(times)[2], 3)
        out.append(row)
    print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": out}))


def run_child(src: Path, samplers: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", *samplers], env=env, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"child on {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="*", default=None)
    ap.add_argument("--peer", type=Path, default=None)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    command = "python benchmarks/sampler_step_gpu.py " + " ".join(sys.argv[1:])
    codes = [("this tree", ROOT / "src")] + ([("peer", args.peer)] if args.peer else [])
    results = {label: run_child(src, SAMPLERS) for label, src in codes}
    device = next(iter(results.values()))["device"]
    lines = ["# Samplers on a GPU: host syncs and time per step", "",
             f"machine: {device}, torch {next(iter(results.values()))['torch']}  ", f"command: `{command}`  ",
             "latents (4, 4, 64, 64) fp32, Karras σ; syncs: synchronising CUDA calls counted by "
             "torch.cuda.set_sync_debug_mode('warn') during one `sample` call; ms/step: median of 5 runs of 20 steps.",
             f"peer: {args.peer or 'none'}", "",
             "| sampler | code | syncs at 10 / 20 steps (pointwise) | syncs at 10 / 20 (UNet) | ms/step pointwise "
             "| ms/step UNet |",
             "|---|---|---|---|---:|---:|"]
    for name in SAMPLERS:
        for label, res in results.items():
            for r in res["rows"]:
                if r["sampler"] == name:
                    lines.append(f"| {name} | {label} | {r['pointwise_syncs_10']} / {r['pointwise_syncs_20']} | "
                                 f"{r['unet_syncs_10']} / {r['unet_syncs_20']} | {r['pointwise_ms_per_step']} | "
                                 f"{r['unet_ms_per_step']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_step_gpu.md").write_text(text)
    (out / "sampler_step_gpu.json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
