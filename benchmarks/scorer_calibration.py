"""Where the adherence scorer's limits sit: its measures on renderings of the data set against the near misses.

    python benchmarks/scorer_calibration.py [--autoencoder runs/demo/autoencoder]

For every object found, the scorer measures the fitted box's aspect ratio, the fill of the template's
interior, and the core colour's tone and hue (eval/adherence.py). This prints their range on the
data set's own renderings (clean; degraded as in the tests: blur 0.7 px, noise 10, colour cast ±20;
degraded harder: blur 1 px, noise 15, cast ±30), on an autoencoder's reconstructions when one is
given, and on the adversarial probes (eval/adversarial.py), beside the limits; the limits must lie
between renderings and probes. Writes benchmarks/results/scorer_calibration.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script
from PIL import Image, ImageFilter

from latentdiff.data.shapes import make_shapes, random_scene, render
from latentdiff.eval import adherence as A
from latentdiff.eval.adversarial import adversarial_probes

MEASURES = {  # name: (value of a detection, the scorer's limit as text)
    "aspect (max of w/h, h/w)": (lambda o: max(o.aspect, 1 / o.aspect), f"≤ {A.MAX_ASPECT}"),
    "fill": (lambda o: o.fill, f"≥ {A.MIN_FILL}"),
    "tone": (lambda o: o.tone, f"{A.TONE_RANGE[0]} … {A.TONE_RANGE[1]}"),
    "hue": (lambda o: o.hue, f"≤ {A.MAX_HUE}"),
}


def degrade(img: np.ndarray, rng: np.random.Generator, blur: float, noise: float, cast: float) -> np.ndarray:
    """Soft edges, noise and a colour cast (tests/test_shapes.py uses blur 0.7, noise 10, cast 20)."""
    soft = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)), np.float32)
    out = soft + rng.normal(0, noise, img.shape) + rng.uniform(-cast, cast, 3)
    return out.round().clip(0, 255).astype(np.uint8)


def ranges(images: list) -> dict[str, str]:
    """min / 1st / 50th / 99th percentile / max of each measure over every object found."""
    dets = [o for im in images for o in A.detect_objects(im) if o.shape != "other" or o.iou > 0]
    out = {"objects": str(len(dets))}
    for name, (value, _) in MEASURES.items():
        v = np.percentile([value(o) for o in dets], [0, 1, 50, 99, 100])
        out[name] = " / ".join(f"{x:.2f}" if name != "hue" else f"{x:.0f}" for x in v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autoencoder", type=Path, help="also measure this autoencoder's reconstructions")
    ap.add_argument("--n", type=int, default=600, help="rendered scenes (a third with two objects)")
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    renders = [render(random_scene(rng, 2 if i % 3 == 0 else 1), 32, rng) for i in range(args.n)]
    rows = {"renderings, clean": ranges(renders),
            "renderings, degraded as in the tests": ranges([degrade(im, rng, 0.7, 10, 20) for im in renders]),
            "renderings, degraded harder": ranges([degrade(im, rng, 1.0, 15, 30) for im in renders])}
    if args.autoencoder:
        from latentdiff.data.transforms import from_uint8_image, to_uint8_image
        from latentdiff.models.folder import load_autoencoder

        images, _ = make_shapes(args.n, "train", seed=123)
        ae = load_autoencoder(args.autoencoder).eval()
        with torch.no_grad():
            recon = torch.cat([to_uint8_image(ae(from_uint8_image(images[i:i + 100]), sample_posterior=False)[0])
                               for i in range(0, args.n, 100)])
        rows[f"reconstructions by {args.autoencoder}"] = ranges(list(recon))
    for name, items in adversarial_probes(24, seed=0).items():
        found = [im for im, _ in items if A.detect_objects(im)]
        rows[f"probe: {name} ({len(found)} of {len(items)} found)"] = ranges(found) if found else {}
    keys = ["objects", *MEASURES]
    lines = ["# Where the adherence scorer's limits sit", "",
             f"Machine: {cpu_name()}. Command: `python benchmarks/scorer_calibration.py"
             + (f" --autoencoder {args.autoencoder}" if args.autoencoder else "") + "`.", "",
             "Each cell: min / 1st percentile / median / 99th percentile / max over the objects found "
             "(probes: only those the scorer finds at all; the others already fail). An object reads as a "
             "shape only within the aspect and fill limits, as a colour only within the tone and hue limits.", "",
             "| images | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
             "| **limit** | | " + " | ".join(f"**{lim}**" for _, lim in MEASURES.values()) + " |"]
    lines += [f"| {name} | " + " | ".join(r.get(k, "–") for k in keys) + " |" for name, r in rows.items()]
    out = Path(__file__).parent / "results" / "scorer_calibration.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
