"""Recipes: several presets trained one after the other into one folder, planned to one time budget.

A recipe is a YAML file (the shipped ones: ``latentdiff/configs/recipes/``) listing its stages::

    stages:
      - name: autoencoder        # the stage's folder under --out, and what later stages call it
        preset: ae-fashion
        share: 0.3               # of the training time left when the stage starts (not the last stage)
      - name: ldm
        preset: ldm-fashion
        overrides: ["latent.autoencoder={autoencoder}"]   # {stage name} is that stage's folder

With a budget (``latentdiff train fashion --minutes 10``) every stage but the last gets ``share`` of the
time left when it starts, after reserving what the next stage's latent encoding will cost (estimated
from the trained autoencoder's own speed), and never more steps than its preset's schedule (the
autoencoder's quality has flattened by then: the minutes go to the diffusion model instead). The last
stage plans to the recipe's deadline. Each stage plans its steps, LR and EMA itself (training/plan.py).
``recipe.json`` in the run folder records which stages are done; ``--resume`` (with any budget) skips
the finished stages, continues an unfinished one, and gives the new minutes to the last stage.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json, save_json
from latentdiff.training import make_trainer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.config import load_config

STATE = "recipe.json"


@dataclass
class Stage:
    """One training of a recipe."""

    name: str
    preset: str
    share: float = 0.0
    overrides: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A named list of stages, and optionally a pixel-space preset to train instead when the budget buys it
    ``pixel_images`` training images (small images on a fast device: no autoencoder to train and encode)."""

    name: str
    stages: list[Stage]
    pixel: Stage | None = None
    pixel_images: int = 0


def list_recipes() -> list[str]:
    """Names of the recipes that ship in latentdiff/configs/recipes."""
    folder = resources.files("latentdiff.configs").joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def is_recipe(name_or_path: str) -> bool:
    """A shipped recipe's name, or a YAML file with a top-level ``stages`` list."""
    if name_or_path in list_recipes():
        return True
    path = Path(name_or_path)
    if not (path.is_file() and path.suffix in (".yaml", ".yml")):
        return False
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False  # load_config gives the error
    return isinstance(d, dict) and "stages" in d


def load_recipe(name_or_path: str) -> Recipe:
    """Read and check a recipe; errors name the file and the stage."""
    if name_or_path in list_recipes():
        text = resources.files("latentdiff.configs").joinpath(f"recipes/{name_or_path}.yaml").read_text()
        where, name = f"recipe {name_or_path}", name_or_path
    else:
        path = Path(name_or_path)
        text, where, name = path.read_text(encoding="utf-8-sig"), str(path), path.stem
    d = yaml.safe_load(text)
    stages = d.get("stages") if isinstance(d, dict) else None
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{where}: 'stages' must be a non-empty list of {{name, preset, share, overrides}}")
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or set(s) - {"name", "preset", "share", "overrides"} or not {"name", "preset"} <= set(s):
            raise UserError(f"{where}: stage {i + 1} needs name and preset (and optionally share, overrides), got {s!r}")
        stage = Stage(str(s["name"]), str(s["preset"]), float(s.get("share", 0.0)), [str(o) for o in s.get("overrides", [])])
        last = i == len(stages) - 1
        if not last and not 0 < stage.share < 1:
            raise UserError(f"{where}: stage {stage.name!r} needs a share in (0, 1) of the time left, got {stage.share}")
        out.append(stage)
    if len({s.name for s in out}) != len(out):
        raise UserError(f"{where}: stage names must differ")
    pixel = d.get("pixel")
    if pixel is None:
        return Recipe(name, out)
    if not isinstance(pixel, dict) or set(pixel) != {"preset", "min_images"} or not isinstance(pixel["min_images"], int):
        raise UserError(f"{where}: 'pixel' must be {{preset: NAME, min_images: N}}, got {pixel!r}")
    return Recipe(name, out, Stage("pixel", str(pixel["preset"])), pixel["min_images"])


def describe(recipe: Recipe, minutes: float | None) -> str:
    """The recipe's plan in one line, printed before anything is trained."""
    parts = []
    for i, s in enumerate(recipe.stages):
        if i == len(recipe.stages) - 1:
            parts.append(f"{s.name} ({s.preset}) until the deadline" if minutes else f"{s.name} ({s.preset})")
        else:
            parts.append(f"{s.name} ({s.preset}) {100 * s.share:.0f} % of the time left, at most its preset's steps"
                         if minutes else f"{s.name} ({s.preset})")
    budget = f"{minutes:g}-minute budget, everything included" if minutes else "each stage's preset steps"
    pixel = (f"; or, if the budget buys it {recipe.pixel_images:,} images, {recipe.pixel.preset} in pixel space alone"
             if recipe.pixel and minutes else "")
    return f"recipe {recipe.name} ({budget}): " + "; then ".join(parts) + pixel


def run_recipe(name_or_path: str, out: Path | str, minutes: float | None = None, overrides: list[str] = (),
               device: str = "auto", resume: bool = False, started: float | None = None,
               progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train every stage of a recipe into ``out`` (module docstring); returns the last stage's model folder."""
    log = log or (lambda m: print(m, file=sys.stderr))
    started = time.perf_counter() if started is None else started
    deadline = started + 60 * minutes if minutes else None
    recipe, out = load_recipe(name_or_path), Path(out)
    state = load_json(out / STATE) if (out / STATE).is_file() else {"recipe": recipe.name, "stages": {}}
    if not resume and state["stages"]:
        raise UserError(f"{out} already holds a {state['recipe']} run; pass --resume to continue it or choose another --out")
    if resume and state.get("recipe") not in (None, recipe.name):
        raise UserError(f"{out} holds a {state['recipe']} run, not {recipe.name}")
    log(describe(recipe, minutes))
    stages = recipe.stages
    if deadline is not None and recipe.pixel is not None:
        if "space" not in state:
            state["space"] = _pick_space(recipe, out / "pixel", list(overrides), device, deadline, log)
        stages = [recipe.pixel] if state["space"] == "pixel" else stages
    folders = {s.name: out / s.name for s in stages}
    for i, stage in enumerate(stages):
        last, record = i == len(stages) - 1, state["stages"].setdefault(stage.name, {"done": False, "seconds": 0.0})
        if record["done"] and not last:
            log(f"{stage.name}: done in an earlier run ({record['steps']} steps); kept")
            continue
        t_stage = time.perf_counter()
        asked = [o.format(**{k: str(v) for k, v in folders.items()}) for o in stage.overrides] + list(overrides)
        folder = folders[stage.name]
        again = latest_checkpoint(folder / "checkpoints") is not None
        cfg = _stage_config(stage, folder, asked, again)
        trainer = make_trainer(cfg, folder, resume=again, device=device, progress=progress, started=t_stage)
        if deadline is not None:
            if last:
                trainer.plan_to(deadline)
            else:
                reserve = trainer.encode_seconds() if hasattr(trainer, "encode_seconds") else 0.0
                now = time.perf_counter()
                until = now + stage.share * max(0.0, deadline - now - reserve)
                cap = load_config(stage.preset, asked).train.steps
                trainer.plan_to(until, max_steps=cap, strict=False)
                log(f"{stage.name}: {(until - now) / 60:.2f} min ({100 * stage.share:.0f} % of the "
                    f"{(deadline - now - reserve) / 60:.2f} min left after reserving {reserve:.0f} s for the latent "
                    f"encoding), at most {cap} steps")
        trainer.run()
        record.update(done=True, steps=trainer.step, seconds=record["seconds"] + time.perf_counter() - t_stage)
        save_json(state, out / STATE)
    return folders[stages[-1].name]


def _pick_space(recipe: Recipe, folder: Path, overrides: list[str], device: str, deadline: float,
                log: Callable[[str], None]) -> str:
    """'pixel' when the pixel preset, timed here at its batch (one warm-up and one timed forward + backward,
    no weights changed), would see at least ``pixel_images`` images before the deadline; else 'latent'."""
    t = time.perf_counter()
    trainer = make_trainer(load_config(recipe.pixel.preset, overrides), folder, device=device, progress=False)
    batch = trainer.cfg.train.batch_size if trainer.cfg.train.batch_size != "auto" else trainer.cfg.train.lr_batch
    trainer.probe_step(batch)
    trainer._sync()
    t1 = time.perf_counter()
    trainer.probe_step(batch)
    trainer._sync()
    rate = batch / (time.perf_counter() - t1)
    images = rate * max(0.0, deadline - time.perf_counter())
    space = "pixel" if images >= recipe.pixel_images else "latent"
    log(f"pixel space ({recipe.pixel.preset}) trains {rate:,.0f} images/s here: {images:,.0f} images in the budget, "
        f"{'at least' if space == 'pixel' else 'fewer than'} the {recipe.pixel_images:,} where it beats the latent "
        f"route: {space} (decided in {time.perf_counter() - t:.1f} s)")
    return space


def _stage_config(stage: Stage, folder: Path, overrides: list[str], resume: bool) -> Any:
    """The stage's config: its preset with the overrides, or on resume its own config.yaml (the overrides may
    then change only train.*, as for `latentdiff train --resume`)."""
    if not resume:
        return load_config(stage.preset, overrides)
    train = [o for o in overrides if o.startswith("train.")]
    saved, asked = load_config(str(folder / "config.yaml"), train), load_config(str(folder / "config.yaml"), overrides)
    if saved.to_dict() != asked.to_dict():
        other = [o for o in overrides if not o.startswith("train.")]
        raise UserError(f"--resume keeps stage {stage.name}'s data and model settings; cannot apply {', '.join(other)}")
    return saved
