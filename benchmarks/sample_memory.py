"""Peak memory of `latentdiff sample` against --n-samples: streaming (this tree) against main's write-at-the-end.

    python benchmarks/sample_memory.py [--ns 16 1000 10000] [--peer /path/to/other/src] [--sd-ns 4 64]

Trains a `digits-tiny` model for a few steps (the weights do not matter for memory), then runs
`latentdiff sample RUN --batch-size 16 --steps 2 --sampler ddim --n-samples N` in a fresh child process per
N and reads that child's peak resident set size (os.wait4's ru_maxrss). With --peer (a `src` folder of
another checkout, e.g. `git archive main src | tar -x -C /tmp/main`), the same command runs on that
code in the same session, alternating with ours, as the comparison. With --sd-ns it also builds a
Stable-Diffusion-sized diffusers folder with random weights (UNet2DConditionModel and AutoencoderKL in
SD v1's configuration, a one-layer CLIP text encoder of SD's width) and runs `latentdiff sample --model
FOLDER --prompt ... --size 512 --steps 1 --batch-size 1` at those N. Writes
benchmarks/results/sample_memory.md and .json (--out for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

SAMPLE_ARGS = ["--batch-size", "16", "--steps", "2", "--sampler", "ddim", "--seed", "0"]
SD_MODEL = "UNet2DConditionModel and AutoencoderKL in SD v1's configuration, a 1-layer CLIP text encoder 768 wide"
SD_ARGS = ["--prompt", "a red circle", "--size", "512", "--steps", "1", "--batch-size", "1",
           "--sampler", "ddim", "--seed", "0"]


def peak_rss_mb(src: Path, run_dir: Path, n: int, out: Path, sd: bool = False) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `latentdiff sample` child running the code in ``src``."""
    env = os.environ | {"PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    model = ["--model", str(run_dir), *SD_ARGS] if sd else [str(run_dir), *SAMPLE_ARGS]
    cmd = [sys.executable, "-m", "latentdiff", "sample", *model, "--n-samples", str(n), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def sd_folder(folder: Path) -> None:
    """A random-weight SD v1-sized pipeline in the diffusers layout (512x512 images, 64x64x4 latents)."""
    import diffusers
    import transformers

    sys.path.insert(0, str(ROOT / "src"))
    from latentdiff.models.tokenizer import CLIPTokenizer

    import torch
    torch.manual_seed(0)
    CLIPTokenizer.default().save(folder.parent / "tokenizer")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2))
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD v1
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                  sample_size=512)  # SD's VAE
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder.parent / "tokenizer"),
        unet=unet, scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def train(run_dir: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "latentdiff", "train", "digits-tiny", "train.steps=4", "data.limit=32",
                    "train.grid_samples=4", "train.grid_steps=2", "--out", str(run_dir)], env=env, check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="*", default=[16, 1000, 10000])
    ap.add_argument("--peer", type=Path, default=None, help="src folder of the checkout to compare against")
    ap.add_argument("--sd-ns", type=int, nargs="*", default=[], help="n_samples for the SD-sized 512x512 pipeline")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sample_memory.md")
    args = ap.parse_args()
    command = "python benchmarks/sample_memory.py " + " ".join(sys.argv[1:])
    machine = f"{cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        if args.ns:
            train(Path(tmp) / "run")
            runs += [("digits-tiny", Path(tmp) / "run", n, False) for n in args.ns]
        if args.sd_ns:
            sd_folder(Path(tmp) / "sd")
            runs += [("SD-sized 512x512", Path(tmp) / "sd", n, True) for n in args.sd_ns]
        for model, run_dir, n, sd in runs:
            peers = [("peer", args.peer)] if args.peer and not sd else []
            for name, src in [("streaming (this tree)", ROOT / "src")] + peers:
                out = Path(tmp) / "out"
                rss, sec = peak_rss_mb(src, run_dir, n, out, sd)
                files = len(list(out.iterdir()))
                shutil.rmtree(out)
                rows.append({"model": model, "code": name, "n_samples": n, "peak_rss_mb": round(rss, 1),
                             "seconds": round(sec, 1), "files": files})
                print(rows[-1], flush=True)
    lines = ["# Peak memory of `latentdiff sample` against --n-samples", "",
             f"machine: {machine}; shared with other jobs while it ran (timings are noisy, memory is not)  ",
             f"command: `{command}`  ",
             f"each run, a fresh process, peak RSS from os.wait4: digits-tiny (16x16 grey, a few training steps): "
             f"`latentdiff sample RUN --n-samples N {' '.join(SAMPLE_ARGS)}`; SD-sized (random weights, "
             f"{SD_MODEL}): `latentdiff sample --model FOLDER --n-samples N {' '.join(SD_ARGS)}`. "
             f"peer: {args.peer or 'none'}", "",
             "| model | code | n_samples | peak RSS (MB) | vs smallest n | seconds | files written |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours = [q for q in rows if q["model"] == r["model"] and q["code"] == r["code"]]
        base = min(ours, key=lambda q: q["n_samples"])["peak_rss_mb"]
        rel = f"{100 * (r['peak_rss_mb'] / base - 1):+.1f} %"
        lines.append(f"| {r['model']} | {r['code']} | {r['n_samples']} | {r['peak_rss_mb']} | {rel} | {r['seconds']} | "
                     f"{r['files']} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                                        indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
