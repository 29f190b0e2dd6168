"""Pictures of the method: forward noising, the reverse trajectory, the noise schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from latentdiff.cli.app import cli
from latentdiff.cli.options import OutputPath, condition_options, naming_options, sampling_options, settings_from
from latentdiff.errors import SettingError, UserError


@cli.group()
def viz() -> None:
    """Draw the method: forward noising, the reverse trajectory, the noise schedules."""


@viz.command("forward")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--t", "ts", default="0,100,250,500,750,999", show_default=True, help="Timesteps, comma-separated.")
@click.option("--schedule", default="linear", show_default=True, help="linear, cosine or scaled_linear.")
@click.option("--num-timesteps", default=1000, show_default=True, type=click.IntRange(min=2), help="T of the schedule.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Use this model's schedule instead.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the noise ε.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Resize the image first.")
@click.option("--out", type=OutputPath(folder=False), default=Path("forward.png"), show_default=True,
              help="PNG to write.")
def viz_forward(image: Path, ts: str, schedule: str, num_timesteps: int, model: Optional[Path], seed: int,
                image_size: Optional[int], out: Path) -> None:
    """IMAGE noised by q(z_t | x) (20.8) at the chosen timesteps, as one labelled strip."""
    from latentdiff.data.images import save_png
    from latentdiff.diffusion import Schedule
    from latentdiff.pipelines.viz import forward_strip, parse_timesteps

    if model is not None:
        from latentdiff.pipelines.generate import Pipeline

        sched = Pipeline.load(model).diffusion.build_schedule()
    else:
        sched = Schedule.from_name(schedule, num_timesteps)
    steps = parse_timesteps(ts)
    if image_size is not None:  # every noised copy is held as floats before the strip is drawn
        from latentdiff.data.source import memory_needed

        problem = memory_needed(len(steps) * 3 * image_size**2 * 4 * 2)
        if problem:
            raise UserError(f"--image-size {image_size}: {len(steps)} noised copies of {image_size}x{image_size} "
                            f"need {problem}; lower --image-size")
    try:
        strip = forward_strip(str(image), sched, steps, seed, image_size)
    except SettingError as e:
        raise naming_options(e) from None
    save_png(strip, out, {"viz": "forward", "t": steps})
    click.echo(f"forward noising: {out}")


@viz.command("reverse")
@click.argument("model_dir", type=click.Path(path_type=Path))
@sampling_options
@condition_options
@click.option("--out", type=OutputPath(folder=False), default=Path("reverse.png"), show_default=True,
              help="PNG strip to write.")
@click.option("--gif", type=OutputPath(folder=False), default=None, help="Also an animated GIF.")
@click.option("--every", default=1, show_default=True, type=click.IntRange(min=1), help="GIF: one frame every N steps.")
@click.option("--duration-ms", default=80, show_default=True, type=click.IntRange(min=10), help="GIF frame time.")
def viz_reverse(model_dir: Path, out: Path, gif: Optional[Path], every: int, duration_ms: int, **params: Any) -> None:
    """The reverse trajectory of one sample: x_t above, the predicted x̂0 below, step by step."""
    from latentdiff.data.images import save_png
    from latentdiff.pipelines.generate import Pipeline
    from latentdiff.pipelines.viz import reverse_trajectory, save_gif

    pipe = Pipeline.load(model_dir)
    try:
        s = pipe.check(settings_from(params))
    except SettingError as e:
        raise naming_options(e) from None
    strip, frames = reverse_trajectory(pipe, s.sampler, s.steps, s.seed, s.spacing, every=every,
                                       class_label=s.class_label, prompt=s.prompt, negative_prompt=s.negative_prompt,
                                       guidance=s.guidance, **s.sampler_options)
    save_png(strip, out, {"viz": "reverse", "model": str(model_dir)} | pipe.describe(s))
    click.echo(f"reverse trajectory: {out}")
    if gif:
        save_gif(frames, gif, duration_ms)
        click.echo(f"animation: {gif}")


@viz.command("schedules")
@click.option("--names", default="linear,cosine,scaled_linear", show_default=True, help="Schedules, comma-separated.")
@click.option("--num-timesteps", default=1000, show_default=True, type=click.IntRange(min=2),
              help="T of the schedules.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Sampler steps shown.")
@click.option("--out", type=OutputPath(folder=False), default=Path("schedules.png"), show_default=True,
              help="PNG to write.")
def viz_schedules(names: str, num_timesteps: int, steps: int, out: Path) -> None:
    """ᾱ_t, log-SNR and the timesteps each spacing visits, for the named schedules."""
    from latentdiff.pipelines.viz import schedule_plots

    schedule_plots(tuple(n.strip() for n in names.split(",") if n.strip()), num_timesteps, steps, out)
    click.echo(f"schedules: {out}")
