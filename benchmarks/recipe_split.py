"""How a time budget should be split between the autoencoder and latent diffusion, and whether pixel space
would do better, on Fashion-MNIST 32x32: measured in steps, so a busy machine gives the same answer.

    python benchmarks/recipe_split.py --minutes 10 --shares 0.15 0.3 0.5 --pixel [--n-eval 1000]
    (or one run per process, e.g. --shares 0.3, and --shares --pixel: the rows are merged)

A budget of ``--minutes`` on a quiet machine is turned into step counts with step times measured there
(``--ldm-step``: seconds per ldm-fashion step; the autoencoder's, the pixel UNet's and the latent
encoding's as ratios to it, measured interleaved by ``--measure``): the time left after the fixed
costs (``--overhead``, the encoding of the 60 000 images) is split, the autoencoder gets ``share`` of it
(at most ae-fashion's steps), the LDM the rest. Each run has the schedule a budgeted run plans for that
many steps (training/plan.py: the preset's schedule stretched), so the step counts are those of
``latentdiff train fashion --minutes N`` with that share. Quality: FID / precision / recall of DDIM-50
samples in the shipped Fashion-MNIST classifier's features against as many test images.
Writes benchmarks/results/recipe_split.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.training import make_trainer
from latentdiff.training.config import load_config
from latentdiff.training.plan import Reference, scaled_extra, scaled_settings

RESULTS = Path(__file__).parent / "results"
SMALL = ["data.limit=1024", "train.checkpoint_every=0", "train.log_every=0"]


def planned(preset: str, steps: int, extra: list[str]) -> list[str]:
    """Overrides that give ``preset`` the schedule a budgeted run plans for ``steps`` steps."""
    cfg = load_config(preset, extra)
    ref = Reference.of(cfg.train, {"disc_start": cfg.ae_loss.disc_start} if cfg.model == "autoencoder" else {})
    s = scaled_settings(ref, steps)
    out = [f"train.{k}={v}" for k, v in s.items()] + [f"ae_loss.{k}={v}" for k, v in scaled_extra(ref, steps).items()]
    return extra + out


def measure(rounds: int) -> dict[str, float]:
    """Seconds of one step of ae-fashion, ldm-fashion, pixel-fashion and of encoding 64 images, interleaved."""
    tmp = Path(tempfile.mkdtemp())
    ae = make_trainer(load_config("ae-fashion", SMALL + ["train.steps=1", "train.grid_samples=4"]), tmp / "ae",
                      device="cpu", progress=False)
    ae.run()  # a 1-step autoencoder: its latents have the right shape, which is all a step's time depends on
    ldm = make_trainer(load_config("ldm-fashion", SMALL + [f"latent.autoencoder={tmp / 'ae'}"]), tmp / "ldm",
                       device="cpu", progress=False)
    pix = make_trainer(load_config("pixel-fashion", SMALL), tmp / "pix", device="cpu", progress=False)
    x = ae.data.batch(torch.arange(64))
    jobs = {"ae": ae.train_step, "ldm": ldm.train_step, "pixel": pix.train_step,
            "encode64": lambda: ae.model.encode(x)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(rounds + 1):
        for name, fn in jobs.items():
            t = time.perf_counter()
            with torch.no_grad() if name == "encode64" else torch.enable_grad():
                fn()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    """Train the splits (and pixel), score them, write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--shares", type=float, nargs="*", default=[0.15, 0.3, 0.5])
    ap.add_argument("--pixel", action="store_true", help="also pixel-fashion on the whole budget")
    ap.add_argument("--ldm-step", type=float, default=64 / 910, help="quiet seconds per ldm-fashion step "
                    "(default: 910 img/s, the recipe's LDM stage in benchmarks/results/time_to_quality_cpu.md)")
    ap.add_argument("--ratios", type=json.loads, default=None, help='{"ae": .., "pixel": .., "encode64": ..} '
                    "step times relative to ldm's (default: --measure)")
    ap.add_argument("--measure", type=int, default=6, help="interleaved rounds to measure the ratios")
    ap.add_argument("--overhead", type=float, default=30.0, help="seconds of start-up, saves and grids")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-recipe-split"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from latentdiff.pipelines.evaluate import evaluate_samples

    if args.ratios is None:
        med = measure(args.measure)
        args.ratios = {k: med[k] / med["ldm"] for k in ("ae", "pixel", "encode64")}
    s_ldm, r = args.ldm_step, args.ratios
    encode = r["encode64"] * s_ldm * 60000 / 64
    train = 60 * args.minutes - args.overhead - encode
    ae_cap = load_config("ae-fashion").train.steps
    runs = {f"latent, share {s:g}": (min(ae_cap, int(s * train / (r["ae"] * s_ldm))), int((1 - s) * train / s_ldm))
            for s in args.shares}
    if args.pixel:
        runs["pixel"] = (0, int((60 * args.minutes - args.overhead) / (r["pixel"] * s_ldm)))
    mine, merged, common = {}, {}, [f"train.threads={args.threads}", "train.checkpoint_every=0"]
    for name, (ae_steps, steps) in runs.items():
        t = time.perf_counter()
        out = args.work / name.replace(", ", "-").replace(" ", "")
        if name == "pixel":
            make_trainer(load_config("pixel-fashion", planned("pixel-fashion", steps, common)), out,
                         device="cpu", progress=False).run()
        else:
            make_trainer(load_config("ae-fashion", planned("ae-fashion", ae_steps, common)), out / "ae",
                         device="cpu", progress=False).run()
            extra = common + [f"latent.autoencoder={out / 'ae'}"]
            make_trainer(load_config("ldm-fashion", planned("ldm-fashion", steps, extra)), out / "ldm",
                         device="cpu", progress=False).run()
            out = out / "ldm"
        q = evaluate_samples(out, args.n_eval, batch_size=250, steps=50)
        mine[name] = {"ae_steps": ae_steps, "steps": steps, "fid": q["fid"], "precision": q["precision"],
                      "recall": q["recall"], "wall_minutes": (time.perf_counter() - t) / 60}
        print(name, mine[name], flush=True)
        merged = merge_rows(args, mine, r, s_ldm, encode, train)  # several processes may share the results file
    write(merged)


def merge_rows(args: argparse.Namespace, rows: dict, ratios: dict, s_ldm: float, encode: float, train: float) -> dict:
    """Add this process's rows to benchmarks/results/recipe_split.json (locked: runs of one budget may be
    split over processes; rows of another budget or other step times are replaced)."""
    import fcntl

    RESULTS.mkdir(exist_ok=True)
    setup = {"minutes": args.minutes, "ratios": ratios, "ldm_step": s_ldm, "encode_seconds": encode,
             "train_seconds": train, "n_eval": args.n_eval, "threads": args.threads}
    with open(RESULTS / "recipe_split.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = RESULTS / "recipe_split.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        merged = old.get("rows", {}) if old.get("setup") == setup else {}
        merged |= {k: v | {"command": f"python {shlex.join(sys.argv)}"} for k, v in rows.items()}
        path.write_text(json.dumps({"setup": setup, "rows": merged}, indent=2))
    (RESULTS / "recipe_split.lock").unlink(missing_ok=True)
    return {"setup": setup, "rows": merged}


def write(results: dict) -> None:
    """benchmarks/results/recipe_split.md from the merged rows."""
    setup, rows = results["setup"], results["rows"]
    r, order = setup["ratios"], sorted(results["rows"], key=lambda k: (k == "pixel", k))
    lines = [f"# Splitting a {setup['minutes']:g}-minute budget: autoencoder vs latent diffusion, and pixel space", "",
             f"machine: {cpu_name()}, {setup['threads']} thread(s) per run, torch {torch.__version__}; "
             f"runs in parallel on a machine shared with other jobs (load average {os.getloadavg()[0]:.1f} "
             "at the last write): step counts are fixed, so the numbers do not depend on the load  ",
             f"step times (as ratios to ldm-fashion's {setup['ldm_step']:.3f} s on 2 quiet cores): "
             + ", ".join(f"{k} {v:.2f}x" for k, v in r.items())
             + f"; latent encoding of 60 000 images {setup['encode_seconds']:.0f} s; {setup['train_seconds']:.0f} s "
             "left to train", "",
             "| run | autoencoder steps | diffusion steps | FID | precision | recall | command |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {k} | {rows[k]['ae_steps']} | {rows[k]['steps']} | {rows[k]['fid']:.1f} | "
              f"{rows[k]['precision']:.2f} | {rows[k]['recall']:.2f} | `{rows[k]['command']}` |" for k in order]
    lines += ["", f"FID etc.: {setup['n_eval']} DDIM-50 samples vs {setup['n_eval']} test images, "
              "shipped Fashion-MNIST classifier features."]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "recipe_split.md").write_text(text)


if __name__ == "__main__":
    main()
