"""Commands around models: convert checkpoints, measure a model folder, serve the web app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click

from latentdiff.cli.app import cli
from latentdiff.cli.options import OutputPath, apply_options, check_device, naming_options, single_file_options
from latentdiff.errors import SettingError, UserError


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "layout", default="latentdiff", show_default=True,
              type=click.Choice(["latentdiff", "diffusers", "single-file"]),
              help="Layout of DST: a latentdiff model folder, a diffusers pipeline folder, or one SD .safetensors "
                   "file (CompVis / A1111 keys).")
@click.option("--half", is_flag=True, help="--to single-file: write float16 tensors (half the size).")
@click.option("--prediction", default=None, type=click.Choice(["eps", "v"]),
              help="Single files: override what the UNet predicts (default: read from the file).")
@click.option("--size", default=None, type=click.IntRange(min=8), help="Default image side stored in DST.")
@apply_options(single_file_options())
def convert(src: Path, dst: Path, layout: str, half: bool, prediction: Optional[str], size: Optional[int],
            config: Optional[Path], tokenizer: Optional[Path]) -> None:
    """Convert a Stable Diffusion checkpoint (single file or diffusers folder) or a model folder to another layout."""
    from latentdiff.formats.paths import check_free_space, check_output_file, check_output_folder
    from latentdiff.pipelines.sd_single_file import save_single_file
    from latentdiff.pipelines.stable_diffusion import load_any, save_diffusers, save_latentdiff

    # checked before any weight is read: below a regular file, a special file, a folder that cannot be written
    (check_output_file if layout == "single-file" else check_output_folder)(dst, "DST")
    if layout == "single-file":
        if dst.exists():
            raise UserError(f"{dst} exists; choose a new file name")
    elif dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} exists and is not empty; choose a new folder")
    if half and layout != "single-file":
        raise UserError("--half applies to --to single-file")
    if src.exists():  # at least half the source's size (fp16 weights are written as fp32; a .ckpt may hold EMA too)
        src_bytes = src.stat().st_size if src.is_file() else sum(
            os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(src) for f in names
            if os.path.isfile(os.path.join(d, f)))
        check_free_space(dst, src_bytes // (4 if half else 2), "DST", f"the converted weights of {src}")
    pipe = load_any(src, "cpu", prediction, tokenizer, config)
    try:
        if layout == "single-file":
            save_single_file(pipe, dst, half, image_size=size)
        else:
            (save_diffusers if layout == "diffusers" else save_latentdiff)(pipe, dst, image_size=size)
    except SettingError as e:
        raise naming_options(e) from None
    click.echo(f"{src} -> {dst} ({layout} layout; {pipe.manifest.source or 'latentdiff model'}, "
               f"{size or pipe.manifest.image_size} px, predicts {pipe.diffusion.prediction})")


@cli.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--n-samples", default=1000, show_default=True, type=click.IntRange(min=10),
              help="Generated images (and held-out real images) to compare; compare FIDs only at equal n.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(min=1),
              help="Images per network call while sampling.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampler steps (NFE); the documented FIDs use 50.")
@click.option("--sampler", default="ddim", show_default=True,
              help="Any sampler of `latentdiff sample`; the documented FIDs use ddim.")
@click.option("--spacing", default=None, help="As for `latentdiff sample`.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sample i uses seed+i.")
@click.option("--features", default=None, help="domain:fashion-mnist | domain:mnist5k | domain:PATH | "
              "inception:PATH (FID Inception weights). Default: the data set's shipped classifier.")
@click.option("--out", type=OutputPath(folder=False), default=None, help="Also write the JSON here.")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, ...")
def eval_cmd(model_dir: Path, n_samples: int, batch_size: int, steps: int, sampler: str, spacing: Optional[str],
             seed: int, features: Optional[str], out: Optional[Path], device: str) -> None:
    """Measure a model folder: FID, CMMD, precision/recall of samples, or PSNR/SSIM/rFID of an autoencoder."""
    import json

    from latentdiff.formats.checkpoint import save_json
    from latentdiff.models.folder import read_manifest
    from latentdiff.pipelines.evaluate import evaluate_reconstruction, evaluate_samples

    if "unet" in read_manifest(model_dir).components:
        try:
            report = evaluate_samples(model_dir, n_samples, batch_size, steps, sampler, seed, features,
                                      spacing=spacing, device=device)
        except SettingError as e:
            raise naming_options(e) from None
    else:
        report = evaluate_reconstruction(model_dir, n_samples, features, device)
    click.echo(json.dumps(report, indent=2, sort_keys=True))
    if out:
        save_json(report, out)


@cli.command()
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A model folder, diffusers SD folder or SD .safetensors/.ckpt file; repeat for more.")
@click.option("--runs", "runs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder of training runs to list (default: ./runs if it exists); repeat for more.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; loopback keeps it private.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--max-steps", default=150, show_default=True, type=click.IntRange(min=1),
              help="Most sampler steps per job.")
@click.option("--max-size", default=1024, show_default=True, type=click.IntRange(min=8), help="Largest image side.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Most images per job.")
@click.option("--queue", default=8, show_default=True, type=click.IntRange(min=1),
              help="Jobs that may wait behind the running one; more are refused with 429 (busy).")
@click.option("--preview-every", default=5, show_default=True, type=click.IntRange(min=0),
              help="Show the predicted image every N steps while sampling (one autoencoder decode each); 0: never.")
@click.option("--keep-jobs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Finished jobs the server remembers (their PNGs stay in --out).")
@click.option("--out", type=OutputPath(), default=Path("outputs"), show_default=True,
              help="Folder for result PNGs (one subfolder per job).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow scripts on this origin to call the API (CORS is closed by default).")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, ...")
def serve(models: tuple[Path, ...], runs: tuple[Path, ...], host: str, port: int, max_steps: int, max_size: int,
          max_batch: int, queue: int, preview_every: int, keep_jobs: int, out: Path, cors_origins: tuple[str, ...],
          device: str) -> None:
    """Start the web app and its JSON API (docs/server.md); binds to loopback unless --host says otherwise."""
    try:
        import uvicorn

        from latentdiff.server import Limits, create_app, load_models
    except ImportError as e:
        raise UserError(f"the web app needs the 'serve' extra: pip install 'latentdiff[serve]' ({e})") from None
    run_roots = list(runs) or ([Path("runs")] if Path("runs").is_dir() else [])
    limits = Limits(max_steps, max_size, max_batch, queue, preview_every, keep_jobs)
    app = create_app(load_models(list(models), device), limits, out, run_roots, list(cors_origins))
    where = "loopback only: other machines cannot connect" if host in ("127.0.0.1", "localhost", "::1") else \
        "ALL machines that can reach this address may use it (no authentication)"
    click.echo(f"serving {len(models)} model(s) on http://{host}:{port}/ ({where}); API docs at /docs")
    uvicorn.run(app, host=host, port=port, log_level="warning")
