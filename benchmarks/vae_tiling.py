"""Tiled vs whole-image autoencoder decode and encode on a trained autoencoder: how big is the seam error?

    python benchmarks/vae_tiling.py runs/demo/ldm [--grid 6] [--tiles 8,12,16]

Builds large images as mosaics of the embedded shapes scenes (a trained autoencoder is convolutional, so
it runs at any size), encodes them, and decodes the latents whole and in overlapping tiles
(``Autoencoder.tile``, 25 % overlap, linear blending). Reports PSNR of the tiled decode against the whole
decode (the error tiling adds) and against the input (the autoencoder's own error), plus the same for encode.
Writes benchmarks/results/vae_tiling.md|json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.data.shapes import make_shapes
from latentdiff.models.folder import load_autoencoder

RESULTS = Path(__file__).parent / "results"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


def main() -> None:
    """Measure and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="model folder with an autoencoder/ component")
    ap.add_argument("--grid", type=int, default=6, help="scenes per side of the mosaic")
    ap.add_argument("--tiles", default="8,12,16", help="latent tile sides to try")
    args = ap.parse_args()
    ae = load_autoencoder(args.model)
    images, _ = make_shapes(args.grid**2 * 2, split="test", seed=5)
    x = images.float() / 127.5 - 1
    n, c, s, _ = x.shape
    mosaic = x[: 2 * args.grid**2].reshape(2, args.grid, args.grid, c, s, s).permute(0, 3, 1, 4, 2, 5)
    mosaic = mosaic.reshape(2, c, args.grid * s, args.grid * s)
    rows = []
    with torch.inference_mode():
        z = ae.encode_latents(mosaic)
        whole = ae.decode_latents(z)
        for tile in map(int, args.tiles.split(",")):
            ae.tile = tile
            part = ae.decode_latents(z)
            z_tiled = ae.encode_latents(mosaic)
            ae.tile = 0
            rows.append({"tile": tile, "decode_psnr_vs_whole": psnr(part, whole),
                         "decode_psnr_vs_input": psnr(part, mosaic),
                         "decode_max_abs_vs_whole": float((part - whole).abs().max()),
                         "encode_rel_err": float((z_tiled - z).norm() / z.norm())})
    result = {"machine": f"{cpu_name()}, torch {torch.__version__}",
              "command": "python benchmarks/vae_tiling.py " + " ".join(map(str, sys.argv[1:])),
              "image": list(mosaic.shape), "latent": list(z.shape), "recon_psnr_whole": psnr(whole, mosaic),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vae_tiling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Tiled autoencoder decode and encode: the error tiles add\n",
             f"Machine: {result['machine']}. Command: `{result['command']}`. Images: {result['image']} mosaics of "
             f"embedded shapes scenes, latents {result['latent']}; 25 % overlap, linear blending. The autoencoder's "
             f"own reconstruction PSNR (whole image) is {result['recon_psnr_whole']:.1f} dB.\n",
             "| latent tile | decode PSNR tiled vs whole (dB) | tiled vs input (dB) | max abs diff (of 2) "
             "| encode: relative latent error |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tile']} | {r['decode_psnr_vs_whole']:.1f} | {r['decode_psnr_vs_input']:.1f} | "
              f"{r['decode_max_abs_vs_whole']:.3f} | "
              f"{r['encode_rel_err']:.4f} |" for r in rows]
    (RESULTS / "vae_tiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
