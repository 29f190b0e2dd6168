"""FID of a trained model against its NFE budget, per sampler (issue: samplers with a certificate).

    python benchmarks/fid_vs_nfe.py runs/bench-latent-vs-pixel/ldm-fashion --n 500

Same seeds and the same held-out real images for every row, so the rows differ only by the sampler
and its steps; the 1000-step ancestral sampler is the reference the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.pipelines.evaluate import evaluate_samples

RUNS = [("ddpm", "trailing", 1000, {})] + [
    (s, sp, n, {}) for s, sp in (("ddim", "trailing"), ("dpmpp_2m", "karras")) for n in (10, 20, 50)] + [
    ("dpm_adaptive", "trailing", 50, {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for sampler, spacing, steps, opts in RUNS:
        t0 = time.perf_counter()
        r = evaluate_samples(args.model, args.n, batch_size=100, steps=steps, sampler=sampler, spacing=spacing)
        rows.append({"sampler": sampler, "spacing": spacing, "steps": steps, "nfe": r["nfe_per_sample"],
                     "fid": r["fid"], "cmmd": r["cmmd"], "precision": r["precision"], "recall": r["recall"],
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    cpu = cpu_name()
    lines = [f"# FID vs NFE: `{args.model}`", "", f"machine: {cpu}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}  ", f"command: `python {' '.join(sys.argv)}`", "",
             f"{args.n} samples (seeds 0..{args.n - 1}) vs {args.n} held-out test images, shipped domain features.", "",
             "| sampler | spacing | NFE | FID | CMMD | precision | recall | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['spacing']} | {r['nfe']:g} | {r['fid']:.1f} | {r['cmmd']:.3f} | "
              f"{r['precision']:.2f} | {r['recall']:.2f} | {r['seconds']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "fid_vs_nfe.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
