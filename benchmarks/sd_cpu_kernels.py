"""Which CPU kernels make a Stable Diffusion v1 step faster: the layers of its 64x64 level, fp32 vs bf16.

    python benchmarks/sd_cpu_kernels.py [--repeats 3]

One layer of each kind at SD v1's largest shapes (batch 2 = one guided step on 64x64 latents): 3x3 conv at
320 channels (plain and channels_last), the feed-forward's first Linear, self-attention over 4096 tokens
(8 heads of 40) through SDPA's fused kernel and through matmul + softmax, GroupNorm + SiLU. CPU seconds of
this process, median of ``--repeats``. These decide what ``--precision bf16`` does on CPU (docs/stable_diffusion.md).
Writes benchmarks/results/sd_cpu_kernels.md|json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py, beside this script

RESULTS = Path(__file__).parent / "results"


def cpu_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def matmul_attention(q, k, v):
    """Attention as two batched matmuls and a softmax (what SDPA's fused kernel replaces)."""
    s = torch.baddbmm(torch.empty(1, dtype=q.dtype), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), beta=0,
                      alpha=q.shape[-1] ** -0.5)
    return torch.bmm(s.softmax(-1), v.flatten(0, 1))


def layers(dtype: torch.dtype) -> dict:
    """name -> call of one SD v1 layer in ``dtype``."""
    cl = torch.channels_last
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dtype)
    conv_cl = torch.nn.Conv2d(320, 320, 3, padding=1).to(dtype).to(memory_format=cl)
    x = torch.randn(2, 320, 64, 64, dtype=dtype)
    x_cl = x.to(memory_format=cl)
    lin = torch.nn.Linear(320, 2560).to(dtype)
    tokens = torch.randn(2, 4096, 320, dtype=dtype)
    q = torch.randn(2, 8, 4096, 40, dtype=dtype)
    gn = torch.nn.GroupNorm(32, 320).to(dtype)
    return {"conv 3x3, 320 ch": lambda: conv(x), "conv 3x3, channels_last": lambda: conv_cl(x_cl),
            "Linear 320 -> 2560": lambda: lin(tokens),
            "attention, SDPA fused": lambda: F.scaled_dot_product_attention(q, q, q),
            "attention, matmul + softmax": lambda: matmul_attention(q, q, q), "GroupNorm + SiLU": lambda: F.silu(gn(x))}


def main() -> None:
    """Time every layer in fp32 and bf16 and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for layer, fn in layers(dtype).items():
                rows.setdefault(layer, {})[name] = cpu_seconds(fn, args.repeats)
    load = Path("/proc/loadavg").read_text().split()[0]
    result = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads, CPU capability "
                         f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, load average {load} "
                         "at the end",
              "command": "python benchmarks/sd_cpu_kernels.py " + " ".join(sys.argv[1:]), "cpu_s": rows}
    lines = ["# SD v1 layers on CPU: fp32 vs bf16 (CPU seconds per call, batch 2, 64x64 level)\n",
             f"Machine: {result['machine']}. Command: `{result['command']}`. Median of {args.repeats}.\n",
             "| layer | fp32 | bf16 | bf16 / fp32 |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['fp32']:.3f} | {v['bf16']:.3f} | {v['bf16'] / v['fp32']:.2f} |" for k, v in rows.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd_cpu_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "sd_cpu_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
