"""Pictures of the method: forward noising strips, reverse trajectories (strip + GIF), schedule plots.

Everything here draws with the library's own math (DESIGN.md, ch. 20): the forward strip samples the
diffusion kernel (20.6) with (20.8); the reverse trajectory records the sampler's callback, which gives
z_t after each step and the step's x̂ = (z_t - √(1-ᾱ_t) ε̂) / √ᾱ_t; latent models are decoded with
x̂ = D(ẑ / s). Text uses PIL's default font (ASCII labels: it has no √ or ᾱ glyphs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from latentdiff.data.decode import read_image
from latentdiff.data.images import to_pil
from latentdiff.data.transforms import from_uint8_image, to_uint8_image
from latentdiff.diffusion import SCHEDULES, Schedule, timesteps_for
from latentdiff.diffusion.sigmas import SIGMA_SPACINGS, TIMESTEP_SPACINGS, sigmas_for
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write
from latentdiff.models.settings import SampleSettings, check_seed
from latentdiff.pipelines.generate import Pipeline

__all__ = ["forward_strip", "noised_images", "trajectory", "reverse_trajectory", "save_gif", "schedule_plots",
           "load_image", "parse_timesteps"]

TILE_MIN_SIDE = 96  # strips: small images are enlarged (nearest) to at least this, so labels fit under them
STRIP_COLUMNS = 10  # reverse strip: about this many evenly chosen steps
PAD = 4
_FONT = None


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=_font())
    return right - left, bottom


def _upscale(img: torch.Tensor, min_side: int) -> torch.Tensor:
    """Enlarge a uint8 (..., H, W) image by an integer factor (nearest) to at least ``min_side``."""
    factor = max(1, math.ceil(min_side / min(img.shape[-2:])))
    return img.repeat_interleave(factor, -1).repeat_interleave(factor, -2) if factor > 1 else img


def _labelled_grid(rows: list[list[torch.Tensor]], captions: list[list[str]], row_names: Sequence[str] = (),
                   min_side: int = TILE_MIN_SIDE) -> Image.Image:
    """Tile uint8 (C, H, W) images in rows, each with text lines under it, row names on the left."""
    tiles = [[_upscale(t, min_side) for t in row] for row in rows]
    c, h, w = tiles[0][0].shape
    line_h = _text_size("Ag")[1] + 2
    n_lines = max((cap.count("\n") + 1 for row in captions for cap in row), default=0)
    col_w = max([w] + [_text_size(line)[0] for row in captions for cap in row for line in cap.split("\n")]) + PAD
    left = (max(_text_size(n)[0] for n in row_names) + 2 * PAD) if row_names else 0
    cell_h = h + n_lines * line_h + PAD
    ncol = max(len(r) for r in tiles)
    mode = "RGB" if c == 3 else "L"
    white = (255, 255, 255) if mode == "RGB" else 255
    black = (0, 0, 0) if mode == "RGB" else 0
    canvas = Image.new(mode, (left + ncol * col_w + PAD, len(tiles) * cell_h + PAD), white)
    draw = ImageDraw.Draw(canvas)
    canvas.info["tiles"] = []  # [(row, col, (left, top, right, bottom))]: where each tile went (not saved to files)
    for r, row in enumerate(tiles):
        y = PAD + r * cell_h
        if row_names:
            draw.text((PAD, y + h // 2 - line_h // 2), row_names[r], font=_font(), fill=black)
        for k, tile in enumerate(row):
            x = left + PAD + k * col_w + (col_w - PAD - w) // 2
            canvas.paste(to_pil(tile), (x, y))
            canvas.info["tiles"].append((r, k, (x, y, x + w, y + h)))
            for j, line in enumerate(captions[r][k].split("\n") if captions[r][k] else []):
                tw = _text_size(line)[0]
                draw.text((left + PAD + k * col_w + (col_w - PAD - tw) // 2, y + h + 1 + j * line_h), line,
                          font=_font(), fill=black)
    return canvas


# ---- forward process ------------------------------------------------------------------------------
def load_image(image: torch.Tensor | str | Path, image_size: Optional[int] = None) -> torch.Tensor:
    """A uint8 (C, H, W) tensor from a tensor or an image file (grey stays 1 channel), optionally resized square."""
    if isinstance(image, (str, Path)):
        return read_image(image, image_size)  # the data sets' decoder: same modes, crop and resampling
    img = torch.as_tensor(image)
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
        raise UserError(f"expected a uint8 (C, H, W) image with C in {{1, 3}}, got {img.dtype} {tuple(img.shape)}")
    if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
        img = torch.nn.functional.interpolate(img[None].float(), size=(image_size, image_size), mode="bicubic",
                                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    return img


def parse_timesteps(text: str) -> list[int]:
    """'0,100,250' -> [0, 100, 250] (for the CLI's --t)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--t takes comma-separated integer timesteps, got {text!r}") from None


def noised_images(image: torch.Tensor | str | Path, schedule: Schedule, ts: Sequence[int], seed: int = 0,
                  image_size: Optional[int] = None) -> torch.Tensor:
    """uint8 (len(ts), C, H, W): one image sampled from q(z_t | x) (20.6) at each t, with one shared ε."""
    T = schedule.num_timesteps
    ts = [int(t) for t in ts]
    if not ts:
        raise UserError("give at least one timestep")
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise UserError(f"timesteps must be in 0..{T - 1} (the schedule's T={T}), got {bad}")
    check_seed(seed)
    img = load_image(image, image_size)
    x = from_uint8_image(img)
    # one ε for every tile, so the strip shows the same noise growing: (20.8) z_t = √ᾱ_t x + √(1-ᾱ_t) ε
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    n = len(ts)
    z = schedule.q_sample(x[None].expand(n, *x.shape), torch.tensor(ts), eps[None].expand(n, *x.shape))
    return to_uint8_image(z)  # values outside [-1, 1] are clamped for display


def forward_strip(image: torch.Tensor | str | Path, schedule: Schedule, ts: Sequence[int], seed: int = 0,
                  image_size: Optional[int] = None) -> Image.Image:
    """One image noised by q(z_t | x) (20.6) at each of ``ts``, a strip labelled with t and √ᾱ_t."""
    tiles = noised_images(image, schedule, ts, seed, image_size)
    abar = schedule.alphas_cumprod[torch.tensor([int(t) for t in ts])].sqrt().tolist()
    captions = [f"t={int(t)}\nsqrt(abar)={a:.3f}" for t, a in zip(ts, abar)]
    return _labelled_grid([list(tiles)], [captions])


# ---- reverse process ------------------------------------------------------------------------------
def _frame(x_t: torch.Tensor, x0: torch.Tensor, caption: str, min_side: int) -> Image.Image:
    pair = [_upscale(x_t, min_side), _upscale(x0, min_side)]
    c, h, w = pair[0].shape
    mode = "RGB" if c == 3 else "L"
    line_h = _text_size("Ag")[1] + 2
    canvas = Image.new(mode, (2 * w + 3 * PAD, h + line_h + 2 * PAD), (255,) * 3 if mode == "RGB" else 255)
    for k, tile in enumerate(pair):
        canvas.paste(to_pil(tile), (PAD + k * (w + PAD), PAD))
    ImageDraw.Draw(canvas).text((PAD, PAD + h + 1), caption, font=_font(), fill=(0,) * 3 if mode == "RGB" else 0)
    return canvas


def trajectory(pipe: Pipeline, sampler: str = SampleSettings.sampler, steps: int = SampleSettings.steps,
               seed: int = 0, spacing: Optional[str] = None, class_label: Optional[int] = None,
               prompt: Optional[str] = None, negative_prompt: Optional[str] = None, guidance: Optional[float] = None,
               **sampler_options: float) -> dict[str, Any]:
    """Per-step uint8 images of one sample: {'t': [t_i], 'x_t': (N, C, H, W), 'x0': (N, C, H, W)}, decoded.

    The sample is the one ``pipe.generate(1, 1, steps, sampler, seed)`` draws: the same core, noise and settings.
    """
    settings = SampleSettings.build(1, 1, steps, sampler, seed, spacing=spacing, class_label=class_label,
                                    prompt=prompt, negative_prompt=negative_prompt, guidance=guidance,
                                    **sampler_options)
    record: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    pipe.sample_latents(settings, callback=lambda step: record.append(
        (step.t, step.z_t.detach().cpu().clone(), step.x0.detach().cpu().clone())))
    # x̂ = D(ẑ / s); for pixel models the identity, clamped by to_uint8_image
    zs = torch.cat([r[1] for r in record]).to(pipe.device)
    x0s = torch.cat([r[2] for r in record]).to(pipe.device)
    xt_img = torch.cat([pipe.core.decode(c) for c in zs.split(16)])
    x0_img = torch.cat([pipe.core.decode(c) for c in x0s.split(16)])
    return {"t": [r[0] for r in record], "x_t": xt_img, "x0": x0_img}


def reverse_trajectory(pipe: Pipeline, sampler: str = SampleSettings.sampler, steps: int = SampleSettings.steps,
                       seed: int = 0, spacing: Optional[str] = None, every: Optional[int] = None, class_label: Optional[int] = None,
                       prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                       guidance: Optional[float] = None, frame_size: int = 84, columns: int = STRIP_COLUMNS, **sampler_options: float,
                       ) -> tuple[Image.Image, list[Image.Image]]:
    """Sample one image (the same as ``pipe.generate(1, 1, steps, sampler, seed)``) and picture every step.

    Returns a strip (x_t above, x̂ below, at about ``columns`` evenly chosen steps) and GIF frames
    [x_t | x̂], one every ``every`` steps (default 1; the last step is always included), enlarged
    (nearest) to at least ``frame_size`` px per tile. Latent models: both rows are decoded, D(z / s).
    """
    for name, v in (("every", 1 if every is None else every), ("columns", columns)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    traj = trajectory(pipe, sampler, steps, seed, spacing, class_label, prompt, negative_prompt, guidance,
                      **sampler_options)
    xt_img, x0_img, ts = traj["x_t"], traj["x0"], traj["t"]
    n = len(ts)
    every = every or 1
    keep = sorted(set(range(0, n, every)) | {n - 1})
    frames = [_frame(xt_img[k], x0_img[k], f"step {k + 1}/{n}  t={ts[k]}", frame_size) for k in keep]
    m = min(columns, n)
    cols = sorted({round(j * (n - 1) / (m - 1)) for j in range(m)}) if m > 1 else [n - 1]
    strip = _labelled_grid([[xt_img[k] for k in cols], [x0_img[k] for k in cols]],
                           [[""] * len(cols), [f"step {k + 1}\nt={ts[k]}" for k in cols]],
                           row_names=("x_t", "x0 pred"))
    return strip, frames


def save_gif(frames: Sequence[Image.Image], path: Path | str, duration_ms: int = 80, hold_last_ms: int = 1000) -> Path:
    """Write frames as a looping animated GIF, atomically (temp file then os.replace); the last frame is held."""
    if not frames:
        raise UserError("no frames to write")
    path = Path(path)
    durations = [duration_ms] * (len(frames) - 1) + [max(duration_ms, hold_last_ms)]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]),
                                                  duration=durations, loop=0, optimize=False, disposal=1))
    return path


# ---- schedules ------------------------------------------------------------------------------------
def schedule_plots(names: Sequence[str] = SCHEDULES, num_timesteps: int = 1000, steps: int = 20,
                   path: Path | str = "schedules.png") -> Path:
    """One PNG with ᾱ_t (20.7) and log-SNR against t per schedule, and the σ each spacing visits at ``steps``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not names:
        raise UserError("give at least one schedule name")
    schedules = [Schedule.from_name(n, num_timesteps) for n in names]
    fig = Figure(figsize=(15, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_a, ax_s, ax_g = fig.subplots(1, 3)
    t = torch.arange(num_timesteps)
    for s in schedules:
        ax_a.plot(t, s.alphas_cumprod, label=s.name)
        ax_s.plot(t, s.log_snr, label=s.name)
    ax_a.set(title="(20.7) $\\bar\\alpha_t = \\Pi_{\\tau \\leq t}\\,(1-\\beta_\\tau)$", xlabel="timestep t",
             ylabel="$\\bar\\alpha_t$")
    ax_s.set(title="log SNR(t) = log $\\bar\\alpha_t / (1-\\bar\\alpha_t)$", xlabel="timestep t", ylabel="log SNR")
    ax_s.axhline(0, color="grey", lw=0.5)
    ref = schedules[0]
    for spacing, marker in zip(TIMESTEP_SPACINGS + SIGMA_SPACINGS, "os^Dv"):
        if spacing == "leading":  # Stable Diffusion's DDIM: steps_offset = 1
            sig = ref.sigmas[timesteps_for(ref, steps, "leading", offset=1)]
            label = "leading (offset 1)"
        else:
            sig = sigmas_for(ref, steps, spacing)[:-1]  # drop the final σ = 0 (log σ = -inf)
            label = spacing
        ax_g.plot(range(1, steps + 1), sig.log(), marker=marker, ms=4, lw=0.8, label=label)
    ax_g.set(title=f"grids visited at {steps} steps ({ref.name}, T={num_timesteps})", xlabel="sampler step",
             ylabel="log $\\sigma$,  $\\sigma_t = \\sqrt{(1-\\bar\\alpha_t)/\\bar\\alpha_t}$")
    ax_g.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_a, ax_s, ax_g):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
