"""FID of a trained model against its NFE budget, per sampler and σ grid (issue 17: samplers ahead at few steps).

    OMP_NUM_THREADS=1 python benchmarks/fid_vs_nfe.py \\
        runs/bench-time-to-quality/latentdiff-cpu-10min/ldm --n 1000

Same seeds and the same held-out real images for every row, so the rows differ only by the sampler, its
grid and its steps. DPM++ 2M Karras is the baseline the issue names; DDIM 50 is the protocol of the
model's documented FID (benchmarks/results/time_to_quality_cpu.md), run again as a check, and DPM++ 2M
Karras at 100 steps is the probability-flow ODE solved closely, what the few-step rows approximate. ``--seed-sets``
repeats the 10-NFE rows on further disjoint seed ranges to show the spread between seed sets.
``--resume`` reuses the rows of the results' .json measured on the same model and n (every row is
deterministic on the CPU), so adding a run measures only that run. The model folder is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.pipelines.evaluate import evaluate_samples
from latentdiff.pipelines.generate import Pipeline

GRIDS = [("dpmpp_2m", "karras"), ("dpmpp_2m", "ays"), ("dpmpp_2m", "fitted"), ("unipc_bh2", "karras"),
         ("unipc_bh2", "ays"), ("unipc_bh2", "fitted"), ("unipc", "trailing"), ("unipc", "fitted"),
         ("deis", "karras"), ("deis", "ays"), ("deis", "fitted"), ("lms", "trailing"), ("lms", "ays")]
REFERENCE = [("ddim", "trailing", 50), ("dpmpp_2m", "karras", 100)]  # the protocol; the ODE solved closely
ADAPTIVE = ("dpm_adaptive", "trailing", 20)  # NFE chosen by the solver (its defaults, rtol = atol = 1e-3)


def distance_to_ode(model: Path, runs: list[tuple[str, str, int, int]], n: int = 256) -> dict[tuple, float]:
    """RMS difference in grey levels (0-255) between each run's images and DPM++ 2M Karras at 100 steps from
    the same seeds 0..n-1: how far each few-step run lands from the ODE solution it approximates."""
    pipe = Pipeline.load(model)
    ref = pipe.generate(n, 128, 100, "dpmpp_2m", 0, spacing="karras").double()
    return {(s, sp, k): float((pipe.generate(n, 128, k, s, 0, spacing=sp).double() - ref).pow(2).mean().sqrt())
            for s, sp, k, seed in runs if seed == 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--seed-sets", type=int, default=1, help="10-NFE rows again on seeds n..2n-1, ...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="reuse rows of the existing results .json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [(s, sp, n, 0) for n in args.nfe for s, sp in GRIDS] + [(*ADAPTIVE, 0)] + [(*r, 0) for r in REFERENCE]
    runs += [(s, sp, 10, k * args.n) for k in range(1, args.seed_sets) for s, sp in GRIDS if 10 in args.nfe]
    out = Path(__file__).parent / "results" / "fid_vs_nfe.md"
    old = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() else []
    done = {(r["sampler"], r["spacing"], r["steps"], r["seed"]): r for r in old
            if r.get("model") == str(args.model) and r.get("n") == args.n}
    rows = []
    for sampler, spacing, steps, seed in runs:
        if (sampler, spacing, steps, seed) in done:
            rows.append(done[(sampler, spacing, steps, seed)])
            continue
        t0 = time.perf_counter()
        r = evaluate_samples(args.model, args.n, batch_size=100, steps=steps, sampler=sampler, spacing=spacing,
                             seed=seed)
        rows.append({"model": str(args.model), "n": args.n, "sampler": sampler, "spacing": spacing, "steps": steps,
                     "seed": seed, "nfe": r["nfe_per_sample"], "fid": r["fid"], "cmmd": r["cmmd"],
                     "precision": r["precision"], "recall": r["recall"], "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    dist = distance_to_ode(args.model, runs)
    for r in rows:
        r["rms_to_ode"] = dist.get((r["sampler"], r["spacing"], r["steps"])) if r["seed"] == 0 else None
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    lines = [f"# FID vs NFE: `{args.model}`", "",
             f"machine: {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__} "
             "(2 cores shared with other jobs: wall times are indicative only)  ",
             f"command: `{env}nice -n 19 python {' '.join(sys.argv)}`", "",
             f"{args.n} samples (seeds s..s+{args.n - 1}) vs {args.n} held-out test images, shipped domain features "
             "(the Fashion-MNIST classifier's, not Inception: compare only at equal n). RMS to ODE: the RMS difference "
             "in grey levels (0-255) between a row's images and DPM++ 2M Karras at 100 steps from the same noise "
             "(seeds 0-255): the solver's own error on this model.", "",
             "| sampler | spacing | NFE | seeds from | FID | CMMD | precision | recall | RMS to ODE | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['spacing']} | {r['nfe']:g} | {r['seed']} | {r['fid']:.1f} | {r['cmmd']:.3f} | "
              f"{r['precision']:.2f} | {r['recall']:.2f} | "
              f"{'—' if r.get('rms_to_ode') is None else format(r['rms_to_ode'], '.2f')} | {r['seconds']:.0f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
