"""Training commands: train a preset or YAML file, list the presets, run the text-to-image demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from latentdiff.cli.app import cli
from latentdiff.cli.options import Finite, OutputPath, check_device, undecodable
from latentdiff.errors import UserError


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("preset_or_yaml")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--steps", type=click.IntRange(min=1), help="Total optimiser steps (overrides train.steps).")
@click.option("--out", type=OutputPath(), default=None, help="Run folder (default: runs/PRESET).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint "
              "(model, EMA, optimiser, data order and RNG), up to --steps.")
@click.option("--device", default="auto", show_default=True, callback=check_device,
              help="auto, cpu, cuda, cuda:1, ...")
@click.option("--minutes", default=None, help="Plan the whole run to end within this many minutes, everything "
              "included (steps, LR decay, EMA length, the split between a recipe's stages): train.time_budget.")
def train(preset_or_yaml: str, overrides: tuple[str, ...], steps: int | None, out: Path | None,
          resume: bool, device: str, minutes: str | None) -> None:
    """Train a diffusion model, an autoencoder or a CLIP model from a preset (`latentdiff presets`) or a YAML file,
    or several of them from a recipe (`fashion`, `shapes`: autoencoder then latent diffusion).

    Overrides look like `train.lr=1e-4 data.source=path/to/images unet.model_channels=64`. A LoRA for any
    text-to-image model: `latentdiff train lora BASE_MODEL data.source=FOLDER [lora.rank=16 ...]`. Started as
    `torchrun --nproc-per-node N -m latentdiff train ...` it trains data-parallel on N processes;
    train.batch_size is then the global batch of a step (README: Training on several GPUs).
    """
    from latentdiff.formats.paths import check_free_space, check_output_folder
    from latentdiff.training import make_trainer
    from latentdiff.training.config import load_config
    from latentdiff.training.plan import check_minutes, process_age
    from latentdiff.training.recipe import is_recipe, run_recipe

    started = time.perf_counter() - process_age()  # a budget counts the start-up too
    for override in overrides:  # the run's config.yaml is UTF-8: undecodable bytes could not be written to it
        if undecodable(override):
            raise UserError(f"override {undecodable(override)}")
    budget = check_minutes(minutes) if minutes is not None else None
    if budget is not None and steps is not None:
        raise UserError("give --steps or --minutes, not both (a budget plans the steps)")
    if out is None:
        out = check_output_folder(Path("runs") / Path(preset_or_yaml).stem, "--out")
    if preset_or_yaml == "lora" and overrides and "=" not in overrides[0]:  # latentdiff train lora BASE_MODEL ...
        overrides = (f"lora.base={overrides[0]}", *overrides[1:])
    if is_recipe(preset_or_yaml):
        if steps is not None:
            raise UserError(f"--steps does not apply to the recipe {preset_or_yaml} (each stage has its preset's); "
                            "give --minutes or override train.steps")
        click.echo(f"model: {run_recipe(preset_or_yaml, out, budget, list(overrides), device, resume, started)}")
        return
    if resume and (out / "config.yaml").is_file():
        cfg = _resumed_config(out, preset_or_yaml, list(overrides))
    else:
        cfg = load_config(preset_or_yaml, list(overrides))
    if steps is not None:
        cfg.train.steps = steps
    if budget is not None:
        cfg.train.time_budget = budget
    from latentdiff.training import distributed

    try:  # under torchrun every process runs this; rank 0 writes and reports
        if cfg.model == "lora":  # the base model may be any SD file: loading it is the pipelines' job
            from latentdiff.pipelines.lora import make_lora_trainer

            trainer = make_lora_trainer(cfg, out, resume=resume, device=device)
        else:
            trainer = make_trainer(cfg, out, resume=resume, device=device, started=started)
        check_free_space(out, checkpoint_bytes(trainer), "--out", "a checkpoint and the exported model")
        grid = trainer.run()
    finally:
        distributed.teardown()
    if trainer.dist.is_main:
        click.echo(f"LoRA: {out / 'lora.safetensors'} (use: --lora {out / 'lora.safetensors'})" if cfg.model == "lora"
                   else f"model: {out}")
        if grid:
            click.echo(f"samples: {grid}")


def checkpoint_bytes(trainer: Any) -> int:
    """A lower bound of what a run writes to disk: its weights twice (a checkpoint and the exported model)
    and the optimisers' moments (AdamW: two per weight)."""
    weights = sum(t.numel() * t.element_size() for m in trainer.modules().values() for t in m.state_dict().values())
    return 2 * weights + sum(2 * p.numel() * p.element_size() for opt in trainer.optimizers().values()
                             for group in opt.param_groups for p in group["params"])


def _resumed_config(out: Path, preset: str, overrides: list[str]):
    """On --resume the run's own config.yaml is authoritative; only train.* and data.workers (how many processes
    decode, never what they decode) may be overridden.

    Other overrides must repeat the run's values, so the command that started a run also resumes it.
    """
    from latentdiff.training.config import load_config

    train = [o for o in overrides if o.startswith(("train.", "data.workers="))]
    saved = load_config(str(out / "config.yaml"), train)
    asked = load_config(str(out / "config.yaml"), overrides)
    bad = [o for o in overrides if o not in train and _setting(asked, o) != _setting(saved, o)]
    if bad:  # anything else would change the model or its data
        has = ", ".join(f"{_key(o)}={_setting(saved, o)!r}" for o in bad)
        raise UserError(f"--resume keeps the run's data, unet and diffusion settings; cannot apply "
                        f"{', '.join(bad)} (the run has {has})")
    return saved


def _key(override: str) -> str:
    return override.partition("=")[0]


def _setting(cfg, override: str):
    """The value a ``section.key=value`` override addresses in ``cfg``."""
    section, _, key = _key(override).partition(".")
    return getattr(getattr(cfg, section), key)


@cli.command()
@click.option("--out", type=OutputPath(), default=Path("runs/demo"),
              show_default=True, help="Folder for both models, the prompt grid and the adherence report.")
@click.option("--minutes", default="8.5", show_default=True,
              help="Training budget of both models together, everything included: the `shapes` recipe plans the "
              "split, steps, LR decay and EMA to it (a slower machine trains fewer steps, still annealed).")
@click.option("--n-eval", default=100, show_default=True, type=click.IntRange(min=1),
              help="Prompts per adherence set (one object seen / unseen, two objects).")
@click.option("--guidance", type=Finite(min=0), default=None,
              help="Guidance scale for the grid and the scores (default: the model's own).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training seed of both models (initial weights, batch order, noise); the data stay the same.")
def demo(out: Path, minutes: str, n_eval: int, guidance: float | None, seed: int) -> None:
    """Text-to-image from scratch: train an autoencoder and a text-conditional LDM on the embedded shapes,
    draw a grid of prompts and print how well the images follow them."""
    from latentdiff.pipelines.demo import run_demo
    from latentdiff.training.plan import check_minutes

    t0 = time.perf_counter()
    summary = run_demo(out, check_minutes(minutes), n_eval, guidance, log=lambda m: click.echo(m, err=True),
                       overrides=[f"train.seed={seed}"] if seed else [])
    click.echo(f"\nprompt adherence (model-free scorer, guidance {summary['guidance']:g}):\n{summary['table']}")
    click.echo(f"\ndiversity of the grid's prompts (spread over seeds / the data's):\n{summary['diversity_table']}")
    click.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; model: {out / 'ldm'}")
    click.echo(f"prompt grid: {summary['grid']}; try: latentdiff sample {out / 'ldm'} --prompt "
               "\"a large blue circle at the top left\"")


@cli.command()
def presets() -> None:
    """List the training presets (and the recipes, several presets in a row) that ship with latentdiff."""
    from latentdiff.training.config import list_presets
    from latentdiff.training.recipe import list_recipes

    for name in list_presets():
        click.echo(name)
    for name in list_recipes():
        click.echo(f"{name} (recipe)")
