"""How a time budget should be split between the autoencoder and latent diffusion, and whether pixel space
would do better, on Fashion-MNIST 32x32: measured in steps, so a busy machine gives the same answer.

    python benchmarks/recipe_split.py --minutes 10 --shares 0.15 0.3 0.5 --pixel [--n-eval 1000]

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
    ap.add_argument("--shares", type=float, nargs="+", default=[0.15, 0.3, 0.5])
    ap.add_argument("--pixel", action="store_true", help="also pixel-fashion on the whole budget")
    ap.add_argument("--ldm-step", type=float, default=64 / 386, help="quiet seconds per ldm-fashion step "
                    "(default: 386 img/s, benchmarks/results/latent_vs_pixel.md, 2 quiet cores)")
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
    rows, common = {}, [f"train.threads={args.threads}", "train.checkpoint_every=0"]
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
        rows[name] = {"ae_steps": ae_steps, "steps": steps, "fid": q["fid"], "precision": q["precision"],
                      "recall": q["recall"], "wall_minutes": (time.perf_counter() - t) / 60}
        print(name, rows[name], flush=True)
    lines = [f"# Splitting a {args.minutes:g}-minute budget: autoencoder vs latent diffusion, and pixel space", "",
             f"machine: {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; load average now "
             f"{os.getloadavg()[0]:.1f}  ", f"command: `python {' '.join(sys.argv)}`  ",
             f"step times (quiet machine, as ratios to ldm-fashion's {s_ldm:.3f} s): "
             + ", ".join(f"{k} {v:.2f}x" for k, v in r.items())
             + f"; latent encoding of 60 000 images {encode:.0f} s; {train:.0f} s left to train", "",
             "| run | autoencoder steps | diffusion steps | FID | precision | recall |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['ae_steps']} | {v['steps']} | {v['fid']:.1f} | {v['precision']:.2f} | {v['recall']:.2f} |"
              for k, v in rows.items()]
    lines += ["", f"FID etc.: {args.n_eval} DDIM-50 samples vs {args.n_eval} test images, shipped Fashion-MNIST "
              "classifier features. Step counts are fixed, so the numbers do not depend on the machine's load."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipe_split.md").write_text(text)
    (RESULTS / "recipe_split.json").write_text(json.dumps({"rows": rows, "ratios": r, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
