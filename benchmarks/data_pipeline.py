"""The streamed input pipeline at scale: pack, read with 0-2 decoding workers, peak memory, sharded latent cache.

    python benchmarks/data_pipeline.py --images 200000 --small 10000      # the full run (a quiet machine)
    python benchmarks/data_pipeline.py --images 4000 --small 1000          # a quick check

1. Draws ``--images`` captioned shapes at 64-128 px a side, mixed aspect ratios, as PNG files (metadata.jsonl),
   and packs them with ``latentdiff data pack`` (--shard-size images a shard); the folder is deleted once packed.
2. Reads the shards as training does (Batches' seeded order, this repository's DataLoader prefetcher) at 64 px
   with 0, 1 and 2 decoding workers, each in a fresh process: images/s after a warm-up, and the peak RSS of
   the process and of its workers; then the same with the first ``--small`` images only (its first shards),
   to show that memory does not grow with the data set.
3. Trains the demo's autoencoder (preset ae-shapes at 64 px) on the shards for a few steps: the training
   step's images/s, the rate the pipeline has to keep up with.
4. Builds the latent cache of ``--cache-images`` images with that (untrained) autoencoder in 1 process
   (2 threads) and in 2 gloo processes under torchrun (1 thread each, each encoding half of the parts).

Writes benchmarks/results/data_pipeline.{md,json}; deletes everything it generated (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

IMAGE_SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw(i: int) -> tuple[str, str]:
    """Image i (seeded by i): one shape on a plain background at 64-128 px a side; its name and caption."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = (int(s) for s in rng.integers(64, 129, 2))
    fg, bg = rng.choice(list(COLOURS), 2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = Image.new("RGB", (w, h), COLOURS[bg])
    d = ImageDraw.Draw(img)
    s = int(min(w, h) * rng.uniform(0.3, 0.7))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    if shape == "circle":
        d.ellipse([x, y, x + s, y + s], fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=COLOURS[fg])
    elif shape == "triangle":
        d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=COLOURS[fg])
    else:
        t = max(2, s // 4)
        d.rectangle([x + (s - t) // 2, y, x + (s + t) // 2, y + s], fill=COLOURS[fg])
        d.rectangle([x, y + (s - t) // 2, x + s, y + (s + t) // 2], fill=COLOURS[fg])
    name = f"{i // 10000:03d}/{i:07d}.png"
    img.save(ROOT / name, compress_level=1)
    return name, f"a {fg} {shape} on {bg}"


def _init(root: str) -> None:
    global ROOT
    ROOT = Path(root)


def generate(folder: Path, n: int) -> float:
    """Draw n images into folder (with metadata.jsonl); seconds taken."""
    t0 = time.perf_counter()
    for k in range(0, n, 10000):
        (folder / f"{k // 10000:03d}").mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count(), _init, (str(folder),)) as pool, open(folder / "metadata.jsonl", "w") as meta:
        for name, caption in pool.imap(draw, range(n), chunksize=256):
            meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return time.perf_counter() - t0


def first_shards(shards: Path, n: int, out: Path) -> Path:
    """A shard set of the first n images: hard links to the first shards and a manifest listing only them."""
    manifest = json.loads((shards / "shards.json").read_text())
    keep, total = [], 0
    for rec in manifest["shards"]:
        if total >= n:
            break
        keep.append(rec)
        total += rec["samples"]
    out.mkdir()
    for rec in keep:
        for suffix in ("", ".idx"):
            os.link(shards / (rec["name"] + suffix), out / (rec["name"] + suffix))
    (out / "shards.json").write_text(json.dumps(manifest | {"shards": keep, "images": total}))
    return out


def measure_pipeline(shards: Path, workers: int, batches: int, buckets: str | None) -> dict:
    """(In a fresh process) read ``batches`` batches of 64 in training order; images/s and peak RSS."""
    import torch

    from latentdiff.data import DataConfig, open_dataset
    from latentdiff.training.batches import Batches, StreamedBatch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = open_dataset(DataConfig(source=str(shards), image_size=IMAGE_SIZE, channels=3, workers=workers,
                                   buckets=buckets, bucket_step=16), min_bucket=64)
    opened = time.perf_counter() - t0
    order = Batches(len(data), 64, seed=1, groups=data.bucket)
    stream = StreamedBatch(data, workers, lambda idx: idx)
    warm, t = 10, None
    for k in range(batches + warm):
        if k == warm:
            t = time.perf_counter()
        idx = order.next()
        stream.images(idx, idx, order)
        [data.captions[i] for i in idx.tolist()]  # what a text-conditional step reads besides the pixels
    rate = batches * 64 / (time.perf_counter() - t)
    stream.close()
    rss = {"main": peak_rss_mb(), "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    return {"images": len(data), "workers": workers, "buckets": buckets, "images_per_s": rate, "open_s": opened,
            "peak_rss_mb": rss["main"], "peak_worker_rss_mb": rss["workers"] if workers else 0.0}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: on Linux that keeps the parent's
    resident set at fork across exec, so a process started by a big one would report the big one's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measure(shards: Path, workers: int, batches: int, buckets: str | None = None, repeats: int = 1) -> dict:
    """measure_pipeline in ``repeats`` fresh processes: the run of median peak RSS, with every run's peak.

    Repeated for the memory comparison: glibc's malloc raises its mmap threshold after freeing a large block,
    and in some processes the per-batch tensors then stay in fragmented heap (we saw +100-180 MB in about
    one process in three; none with MALLOC_MMAP_THRESHOLD_ fixed), whatever the data set's size.
    """
    cmd = [sys.executable, __file__, "--measure", str(shards), "--workers", str(workers), "--batches", str(batches)]
    cmd += ["--buckets", buckets] if buckets else []
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(repeats)]
    runs.sort(key=lambda r: r["peak_rss_mb"])
    return runs[len(runs) // 2] | {"peak_rss_runs_mb": [r["peak_rss_mb"] for r in runs]}


def train_rate(shards: Path, workdir: Path, steps: int) -> dict:
    """images/s of `latentdiff train ae-shapes` on the shards at 64 px (2 decoding workers), after the first log."""
    out = workdir / "train"
    cmd = [sys.executable, "-m", "latentdiff", "train", "ae-shapes", "--out", str(out), "--device", "cpu",
           f"data.source={shards}", f"data.image_size={IMAGE_SIZE}", "data.workers=2", f"train.steps={steps}",
           "train.log_every=5", "train.checkpoint_every=0", "train.grid_samples=4"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows[1:]]
    return {"images_per_s": sum(rates) / len(rates), "batch": 16, "command": "latentdiff " + " ".join(cmd[3:])}


def cache_worker(shards: Path, out: Path, limit: int) -> None:
    """(Under torchrun or alone) build the latent cache of the first ``limit`` images; rank 0 prints seconds."""
    import torch

    from latentdiff.data import DataConfig, open_dataset
    from latentdiff.models.autoencoder import Autoencoder
    from latentdiff.training import distributed
    from latentdiff.training.config import load_config
    from latentdiff.training.latents import LatentData

    env, device = distributed.setup(torch.device("cpu"))
    torch.manual_seed(0)
    ae = Autoencoder(load_config("ae-shapes").autoencoder)
    data = open_dataset(DataConfig(source=str(shards), image_size=IMAGE_SIZE, channels=3, limit=limit, workers=1))
    t0 = time.perf_counter()
    cache = LatentData(data, ae, "benchmark", out, hflip=False, device=device, dist=env)
    seconds = time.perf_counter() - t0
    if env.is_main:
        idx = torch.arange(0, len(data), max(1, len(data) // 512))
        torch.save(cache.moments(idx)[0], out / "probe.pt")
        print(json.dumps({"seconds": seconds, "images": len(data)}))
    distributed.teardown()


def run_cache(shards: Path, workdir: Path, limit: int, processes: int) -> dict:
    out = workdir / f"cache{processes}"
    script = [__file__, "--cache-worker", str(shards), str(out), "--limit", str(limit)]
    if processes == 1:
        cmd, threads = [sys.executable, *script], 2
    else:
        cmd, threads = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(processes), *script], 1
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    got = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env | {"OMP_NUM_THREADS": str(threads)})
    row = json.loads(got.stdout.strip().splitlines()[-1])
    return row | {"processes": processes, "threads_each": threads, "images_per_s": row["images"] / row["seconds"],
                  "folder": str(out)}


def main() -> None:
    """Generate, pack, measure, write the table, clean up."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200000)
    ap.add_argument("--small", type=int, default=10000, help="the smaller set for the memory comparison")
    ap.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    ap.add_argument("--batches", type=int, default=200, help="batches of 64 timed per pipeline measurement")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--cache-images", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory comparison (2 workers, both sizes): no other worker counts, training, cache")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--buckets", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_pipeline(args.measure, args.workers, args.batches, args.buckets)))
        return
    if args.cache_worker:
        cache_worker(*args.cache_worker, args.limit)
        return
    from latentdiff.data.pack import pack_folder

    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="latentdiff-bench-", dir=args.workdir))
    try:
        folder, shards = workdir / "folder", workdir / "shards"
        gen_s = generate(folder, args.images)
        folder_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        t0 = time.perf_counter()
        manifest = pack_folder(folder, shards, args.shard_size)
        pack_s = time.perf_counter() - t0
        shutil.rmtree(folder)
        shards_mb = sum(p.stat().st_size for p in shards.iterdir()) / 2**20
        small = first_shards(shards, args.small, workdir / "small")
        print(f"generated {args.images} images in {gen_s:.0f} s, packed in {pack_s:.0f} s", file=sys.stderr)
        if args.memory_only:
            big = run_measure(shards, 2, args.batches, repeats=5)
            small_run = run_measure(small, 2, args.batches, repeats=5)
            print(json.dumps({"machine": f"{cpu_name()}, load {load:.1f}", "pack_s": pack_s, "generate_s": gen_s,
                              "big": big, "small": small_run,
                              "rss_change": big["peak_rss_mb"] / small_run["peak_rss_mb"] - 1,
                              "worker_rss_change": big["peak_worker_rss_mb"] / small_run["peak_worker_rss_mb"] - 1},
                             indent=1))
            return
        runs = [run_measure(shards, w, args.batches, repeats=5 if w == 2 else 1) for w in (0, 1, 2)]
        runs.append(run_measure(shards, 2, args.batches, "auto"))
        runs.append(run_measure(small, 2, args.batches, repeats=5))
        train = train_rate(shards, workdir, args.train_steps)
        caches = [run_cache(shards, workdir, args.cache_images, p) for p in (1, 2)]
        import torch

        probes = [torch.load(Path(c["folder"]) / "probe.pt") for c in caches]
        cache_gap = float((probes[0] - probes[1]).abs().max())
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.perf_counter() - t_start
    big, small_run = runs[2], runs[4]
    rss_change = big["peak_rss_mb"] / small_run["peak_rss_mb"] - 1  # same workers, 2: the training default
    worker_change = big["peak_worker_rss_mb"] / small_run["peak_worker_rss_mb"] - 1
    machine = f"{cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} at start"
    cmd = f"python benchmarks/data_pipeline.py --images {args.images} --small {args.small} --shard-size " \
          f"{args.shard_size} --batches {args.batches} --train-steps {args.train_steps} " \
          f"--cache-images {args.cache_images}"
    lines = ["# The streamed input pipeline", "", f"Machine: {machine}", "", f"`{cmd}` ({total_s / 60:.0f} min)", "",
             f"{args.images} generated PNGs (64-128 px a side, mixed aspects; {folder_mb:.0f} MB) packed into "
             f"{len(manifest['shards'])} shards ({shards_mb:.0f} MB) in {pack_s:.0f} s "
             f"({args.images / pack_s:.0f} images/s, every image decoded once to check it); drawing them took "
             f"{gen_s:.0f} s.", "",
             "Reading in training order (seeded random: any image of any shard), decoded to 64x64, batches of 64:", "",
             "| images | decoding workers | buckets | index opened (s) | images/s | peak RSS, process (MB) | "
             "peak RSS, a worker (MB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['images']} | {r['workers']} | {r['buckets'] or '-'} | {r['open_s']:.2f} | "
              f"{r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_worker_rss_mb']:.0f} |" for r in runs]
    lines += ["", f"Peak RSS from {small_run['images']} to {big['images']} images (2 workers, the median of 5 "
              f"processes each): process {rss_change:+.1%}, workers {worker_change:+.1%}. The 5 processes' peaks: "
              f"{', '.join(f'{v:.0f}' for v in small_run['peak_rss_runs_mb'])} MB and "
              f"{', '.join(f'{v:.0f}' for v in big['peak_rss_runs_mb'])} MB (the process's peak is /proc's VmHWM; a "
              "peak far above the others is glibc keeping freed batch memory, see run_measure).", "",
              f"Training step it has to keep up with: `{train['command']}`: "
              f"{train['images_per_s']:.0f} images/s.", "",
              "Latent cache of the first {0} images (ae-shapes autoencoder, untrained: the cost is the "
              "same), decoded by 1 worker per process:".format(args.cache_images), "",
              "| processes | threads each | seconds | images/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['processes']} | {c['threads_each']} | {c['seconds']:.0f} | {c['images_per_s']:.0f} |"
              for c in caches]
    lines += ["", f"The two caches agree to {cache_gap:.1e} (largest difference over a probe of 512 images' means)."]
    out = Path(__file__).parent / "results" / "data_pipeline"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "command": cmd, "total_s": total_s, "generate_s": gen_s, "pack_s": pack_s,
         "folder_mb": folder_mb, "shards_mb": shards_mb, "pipeline": runs, "train": train,
         "cache": [{k: v for k, v in c.items() if k != "folder"} for c in caches], "cache_gap": cache_gap,
         "rss_change": rss_change, "worker_rss_change": worker_change}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
