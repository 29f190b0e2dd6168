"""Dedicated inpainting vs inpainting by replacement, and SR3 super-resolution vs bicubic (Fashion-MNIST).

    python benchmarks/image_tasks.py --inpaint runs/bench-tasks/ldm-inpaint \
        --ldm runs/bench-recipe-split/latent-share0.3/ldm --sr runs/bench-tasks/sr-pixel \
        --sr-latent runs/bench-tasks/sr-latent

Inpainting: held-out test images, two fixed masks (a centre box, brush strokes). The known region is
measured on the raw decoded output (before the exact paste-back) against the autoencoder's own
reconstruction error on the same pixels; the hole against the true image (MSE, and FID of the pasted
outputs with the shipped Fashion-MNIST features). Super-resolution: test images downsampled (bicubic,
antialiased, stored as uint8 like a PNG), upscaled by one sample (seed 0) and by bicubic; PSNR / SSIM
against the original, and the diversity: mean over pixels of the std over 8 seeds.
Writes benchmarks/results/image_tasks.{md,json} and the example figures in docs/tasks/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.data.masks import random_masks
from latentdiff.data.transforms import from_uint8_image, resize_bicubic, to_uint8_image
from latentdiff.eval import build_extractor, fid_from_features, psnr, ssim
from latentdiff.pipelines.evaluate import reference_images
from latentdiff.pipelines.generate import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def masks(size: int) -> dict[str, torch.Tensor]:
    """Keep-masks (1 = keep): a centre box of half the side, and the first stroke mask of a fixed seed."""
    box = torch.ones(size, size)
    box[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0
    g = torch.Generator().manual_seed(7)
    while True:  # draw until a stroke mask (neither a box nor the whole image) covering 20-40 %
        m = random_masks(1, size, g, full_prob=0.0)[0, 0]
        rows = m.any(1).sum() * m.any(0).sum()
        if m.sum() < rows and 0.2 < float(m.mean()) < 0.4:
            return {"centre box": box, "strokes": 1 - m}


def masked_mse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Mean squared error in [0, 1] units over the pixels where ``where`` (the shape of a) is 1."""
    d = (a.double() - b.double()) / 255
    return float((d.pow(2) * where).sum() / where.sum())


def psnr_of(mse: float) -> float:
    return 10 * torch.log10(torch.tensor(1 / mse)).item()


def inpainting(args: argparse.Namespace, feats) -> tuple[list[dict], torch.Tensor]:
    dedicated, plain = [Pipeline.load(p) for p in args.inpaint], Pipeline.load(args.ldm)
    real, _ = reference_images(plain.manifest, args.n)
    with torch.no_grad():
        ae = plain.autoencoder
        recon = to_uint8_image(ae.decode_latents(ae.encode_latents(from_uint8_image(real))))
    methods = [(f"dedicated model (9-ch, step {d.manifest.step}), ddim 50", d, {"sampler": "ddim", "steps": 50})
               for d in dedicated] + [
               ("replacement, ddim 50", plain, {"sampler": "ddim", "steps": 50}),
               ("replacement + RePaint x4, ddpm 50", plain, {"sampler": "ddpm", "steps": 50, "resample": 4})]
    real_feats = feats(real)
    rows, figure = [], [real[:8]]
    for mask_name, keep in masks(real.shape[-1]).items():
        known, hole = keep.expand_as(real), 1 - keep.expand_as(real)
        figure.append(torch.where(keep.bool(), real[:8], torch.full_like(real[:8], 128)))  # the masked input
        base = {"mask": mask_name, "hole_fraction": float(hole[0].mean())}
        rows.append(base | {"method": "autoencoder reconstruction (reference)",
                            "known_psnr": psnr_of(masked_mse(recon, real, known)),
                            "hole_mse": masked_mse(recon, real, hole)})
        other = real.roll(1, 0)  # an unrelated test image's pixels in the hole: the error of a plausible guess
        rows.append(base | {"method": "another test image in the hole (reference)",
                            "hole_mse": masked_mse(other, real, hole),
                            "fid": fid_from_features(feats(torch.where(keep.bool(), real, other)), real_feats)})
        for name, pipe, opts in methods:
            t0 = time.perf_counter()
            raw = pipe.inpaint(real, keep, batch_size=100, seed=0, paste=False, **opts)
            dt = (time.perf_counter() - t0) / len(real)
            pasted = torch.where(keep.bool(), real, raw)
            rows.append(base | {"method": name, "known_psnr": psnr_of(masked_mse(raw, real, known)),
                                "hole_mse": masked_mse(raw, real, hole),
                                "fid": fid_from_features(feats(pasted), real_feats), "s_per_image": dt})
            figure.append(pasted[:8])
            print(rows[-1], flush=True)
    return rows, torch.cat(figure)


def super_resolution(path: Path, n: int, n_div: int, steps: int) -> tuple[dict, torch.Tensor]:
    pipe = Pipeline.load(path)
    real, _ = reference_images(pipe.manifest, n)
    size, low_size = pipe.manifest.image_size, pipe.manifest.low_res_size
    low = to_uint8_image(resize_bicubic(from_uint8_image(real), low_size))
    bicubic = to_uint8_image(resize_bicubic(from_uint8_image(low), size))
    t0 = time.perf_counter()
    sr = pipe.upscale(low, batch_size=100, steps=steps, sampler="ddim", seed=0)
    dt = (time.perf_counter() - t0) / n
    seeds = torch.stack([pipe.upscale(low[i:i + 1], n_samples=8, steps=steps, sampler="ddim", seed=100)
                         for i in range(n_div)])  # (n_div, 8, C, H, W)
    diversity = float((seeds.double() / 255).std(1).mean())
    mean8 = seeds.double().mean(1).round().to(torch.uint8)

    def down(x: torch.Tensor) -> torch.Tensor:
        return to_uint8_image(resize_bicubic(from_uint8_image(x), low_size))

    f = lambda a, b: {"psnr": psnr(a.float(), b.float(), 255.0), "ssim": ssim(a.float(), b.float(), 255.0)}  # noqa: E731
    row = {"model": str(path), "step": pipe.manifest.step, "sizes": f"{low_size} -> {size}",
           "attention_block": pipe.unet.config.attention_block,
           "space": "latent" if "autoencoder" in pipe.manifest.components else "pixel",
           "bicubic": f(bicubic, real), "sr": f(sr, real), "sr_mean_of_8": f(mean8, real[:n_div]),
           "bicubic_first_n_div": f(bicubic[:n_div], real[:n_div]),
           "consistency_psnr_sr": psnr(down(sr).float(), low.float(), 255.0),
           "consistency_psnr_bicubic": psnr(down(bicubic).float(), low.float(), 255.0),
           "diversity_std": diversity, "s_per_image": dt, "steps": steps}
    if row["space"] == "latent":
        with torch.no_grad():
            ae = pipe.autoencoder
            rec = to_uint8_image(ae.decode_latents(ae.encode_latents(from_uint8_image(real))))
        row["autoencoder_reconstruction"] = f(rec, real)
    print(row, flush=True)
    nearest = low.repeat_interleave(size // low_size, -1).repeat_interleave(size // low_size, -2)
    k = min(6, n_div)
    fig = torch.stack([nearest[:k], bicubic[:k], *seeds[:k, :4].transpose(0, 1), real[:k]], 1).flatten(0, 1)
    return row, fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inpaint", type=Path, nargs="+", required=True,
                    help="dedicated inpainting model(s) (ldm-fashion-inpaint)")
    ap.add_argument("--ldm", type=Path, required=True, help="plain LDM on the same autoencoder (ldm-fashion)")
    ap.add_argument("--sr", type=Path, nargs="+", required=True,
                    help="pixel-space SR3 model(s) (sr-fashion; the first one's samples make the figure)")
    ap.add_argument("--sr-latent", type=Path, required=True, help="latent SR model (sr-fashion-latent)")
    ap.add_argument("--n", type=int, default=500, help="test images for inpainting and latent SR")
    ap.add_argument("--n-sr-pixel", type=int, default=200, help="test images for pixel SR (slow on a CPU)")
    ap.add_argument("--n-div", type=int, default=32, help="test images for the diversity over 8 seeds")
    ap.add_argument("--sr-steps", type=int, default=20)
    ap.add_argument("--only", choices=("inpaint", "sr"), default=None,
                    help="run one part; the other part's rows are kept from the existing results JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 runs faster on an oversubscribed machine)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the report goes")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "tasks", help="where the example images go")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    old = args.results / "image_tasks.json"
    kept = json.loads(old.read_text()) if args.only and old.is_file() else {}
    inp_rows, sr_rows = kept.get("inpainting", []), kept.get("super_resolution", [])
    runs = [r for r in kept.get("runs", []) if r["part"] not in (args.only or "all", "all")]
    if args.only != "sr":
        inp_rows, inp_fig = inpainting(args, build_extractor("domain:fashion-mnist"))
        save_png(make_grid(upscale_nearest(inp_fig, 64), 8), args.figures / "inpaint_model.png",
                 {"rows": "original; per mask: masked input, dedicated model(s), replacement, RePaint x4"})
    if args.only != "inpaint":
        sr_rows = []
        pixel = [(path, args.n_sr_pixel, "upscale.png" if i == 0 else None) for i, path in enumerate(args.sr)]
        for path, n, name in pixel + [(args.sr_latent, args.n, "upscale_latent.png")]:
            row, fig = super_resolution(path, n, args.n_div, args.sr_steps)
            sr_rows.append(row)
            if name:
                save_png(make_grid(upscale_nearest(fig, 64), 7), args.figures / name,
                         {"columns": "low-res (nearest), bicubic, 4 seeds, original"})
    runs.append({"part": args.only or "all", "command": f"python {' '.join(sys.argv)}",
                 "minutes": round((time.perf_counter() - t_start) / 60, 1)})
    write_report(args, inp_rows, sr_rows, runs)


def write_report(args: argparse.Namespace, inp_rows: list[dict], sr_rows: list[dict], runs: list[dict]) -> None:
    fmt = lambda v, p: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["# Image tasks: dedicated inpainting and SR3 super-resolution (Fashion-MNIST)", "",
             f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device cpu  ",
             *[f"command ({r['part']}, {r['minutes']} min): `{r['command']}`  " for r in runs], "",
             f"## Inpainting ({args.n} test images per mask, 32x32)", "",
             f"dedicated: {', '.join(f'`{p}`' for p in args.inpaint)}; replacement: `{args.ldm}` "
             f"(step {json.loads((args.ldm / 'model_index.json').read_text())['step']}), the same autoencoder.", "",
             "| mask (hole) | method | known-region PSNR dB (raw output) | hole MSE | FID (pasted) | s/image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in inp_rows:
        lines.append(f"| {r['mask']} ({r['hole_fraction']:.0%}) | {r['method']} | {fmt(r.get('known_psnr'), 2)} | "
                     f"{fmt(r.get('hole_mse'), 4)} | {fmt(r.get('fid'), 1)} | {fmt(r.get('s_per_image'), 3)} |")
    lines += ["", "Known-region PSNR is over the kept pixels of the decoded output before the exact paste-back; "
              "the autoencoder row is the best a latent model can do there. Hole MSE in [0, 1] units. FID with "
              "the shipped Fashion-MNIST classifier features, the pasted outputs against the original images.", "",
              "## Super-resolution", "",
              "| model | attention | space | sizes | step | PSNR bicubic | PSNR SR (1 sample) | PSNR mean of 8 | "
              "SSIM bicubic | SSIM SR | diversity (std over 8 seeds) | consistency PSNR SR / bicubic | s/image |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sr_rows:
        lines.append(f"| `{r['model']}` | {r.get('attention_block', 'transformer')} | {r['space']} | {r['sizes']} | "
                     f"{r['step']} | {r['bicubic']['psnr']:.2f} | "
                     f"{r['sr']['psnr']:.2f} | {r['sr_mean_of_8']['psnr']:.2f} "
                     f"(bicubic {r['bicubic_first_n_div']['psnr']:.2f}) | "
                     f"{r['bicubic']['ssim']:.3f} | {r['sr']['ssim']:.3f} | {r['diversity_std']:.4f} | "
                     f"{r['consistency_psnr_sr']:.1f} / {r['consistency_psnr_bicubic']:.1f} | {r['s_per_image']:.3f} |")
    for r in sr_rows:
        if "autoencoder_reconstruction" in r:
            a = r["autoencoder_reconstruction"]
            lines.append(f"\nThe latent model's autoencoder alone reconstructs the originals at PSNR "
                         f"{a['psnr']:.2f} dB, SSIM {a['ssim']:.3f}: a ceiling for any latent method.")
    lines += ["", f"SR: DDIM {args.sr_steps} steps; {args.n_sr_pixel} (pixel) / {args.n} (latent) test images, one "
              f"sample each (seed 0); 'mean of 8' and diversity on the first {args.n_div} images with seeds 100..107. "
              "Consistency: PSNR between the output downsampled again and the low-res input. "
              "PSNR/SSIM on uint8 images, data range 255."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.results / "image_tasks.md"
    out.write_text(text)
    results = {"inpainting": inp_rows, "super_resolution": sr_rows, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
