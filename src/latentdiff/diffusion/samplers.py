"""Samplers: short pure functions over an ε-predictor and a schedule, and the one public ``sample``.

Every sampler has the signature ``(eps_fn, x_T, schedule, timesteps, generator, callback, **opts)``
and keeps no state between calls, so one harness (tests/test_samplers.py) checks them all against a
Gaussian data distribution whose exact denoiser is known in closed form.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from latentdiff.diffusion.schedule import Schedule, posterior_between
from latentdiff.errors import UserError

EpsFn = Callable[[Tensor, Tensor], Tensor]
# callback(i, t, x_t, x0_pred): called once per step, e.g. for progress bars and x0 previews.
Callback = Optional[Callable[[int, int, Tensor, Tensor], None]]
SPACINGS = ("trailing", "leading", "linspace")


class NonFiniteError(UserError):
    """The sampler produced NaN or inf values; the message names the step."""


def as_eps_fn(model_fn: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, prediction: str) -> EpsFn:
    """Adapt a network that predicts ε, x0 or v to the ε-predictor every sampler takes."""
    if prediction == "eps":
        return model_fn
    return lambda x, t: schedule.to_eps(model_fn(x, t), x, t, prediction)


def timesteps_for(schedule: Schedule, steps: int, spacing: str = "trailing", offset: int = 0) -> list[int]:
    """The descending integer timesteps a sampler visits (the spacings diffusers users know).

    'trailing' always starts at T-1 (the pure-noise end), which is why it is the default: 'leading'
    (Stable Diffusion's DDIM with ``offset=1``) never reaches the last timestep at few steps.
    """
    T = schedule.num_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise UserError(f"steps={steps} is larger than the schedule's {T} timesteps")
    if spacing == "trailing":
        ts = [round(T - 1 - i * T / steps) for i in range(steps)]
    elif spacing == "leading":
        ts = [i * (T // steps) + offset for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return [min(max(t, 0), T - 1) for t in ts]


def randn_cpu(shape: tuple[int, ...], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Standard normal noise drawn on the CPU, so a seed gives the same image on any device.

    ``generator`` is a torch.Generator, None (global RNG), or any object with ``randn(shape)`` (such as
    the pipelines' per-sample noise, which keeps each image independent of the batch it is drawn in).
    """
    if hasattr(generator, "randn"):
        return generator.randn(shape).to(like.device, like.dtype)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _abar(schedule: Schedule, t: int) -> float:
    """ᾱ_t, with ᾱ = 1 for the virtual step t = -1 (clean data)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _predict(eps_fn: EpsFn, x: Tensor, t: int, abar_t: float, clip_x0: Optional[float]) -> tuple[Tensor, Tensor]:
    """ε̂ and x̂ at (x, t); with ``clip_x0`` the clean estimate is clamped and ε̂ made consistent."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = eps_fn(x, tt)
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5  # x̂ = (z_t - √(1-ᾱ_t) ε̂) / √ᾱ_t
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    return eps, x0


def ddpm(eps_fn: EpsFn, x: Tensor, schedule: Schedule, timesteps: list[int],
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         clip_x0: Optional[float] = None) -> Tensor:
    """Ancestral sampling: z_s ~ q(z_s | z_t, x̂), the posterior (20.13)–(20.15) with x replaced by x̂."""
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_s = _abar(schedule, t), _abar(schedule, s)
        eps, x0 = _predict(eps_fn, x, t, a_t, clip_x0)
        mean, var = posterior_between(x0, x, a_t, a_s)
        x = mean + var.sqrt() * randn_cpu(x.shape, generator, x) if s >= 0 else mean
        _check(x, i, t, callback, x0)
    return x


def ddim(eps_fn: EpsFn, x: Tensor, schedule: Schedule, timesteps: list[int],
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         eta: float = 0.0, clip_x0: Optional[float] = None) -> Tensor:
    """DDIM (Song et al. 2021): x_s = √ᾱ_s x̂ + √(1-ᾱ_s-σ²) ε̂ + σ z; η=0 deterministic, η=1 ≡ ddpm."""
    if eta < 0:
        raise UserError(f"eta must be >= 0, got {eta}")
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_s = _abar(schedule, t), _abar(schedule, s)
        eps, x0 = _predict(eps_fn, x, t, a_t, clip_x0)
        # σ² = η² (1-ᾱ_s)/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_s): the posterior variance (20.15) scaled by η²
        var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        x = a_s**0.5 * x0 + max(1 - a_s - var, 0.0) ** 0.5 * eps
        if var > 0:
            x = x + var**0.5 * randn_cpu(x.shape, generator, x)
        _check(x, i, t, callback, x0)
    return x


def _check(x: Tensor, i: int, t: int, callback: Callback, x0: Tensor) -> None:
    """Stop with the step number on NaN/inf (the black-image failure), then report progress."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"non-finite values at sampling step {i} (timestep {t}); "
                             "try fp32 or a smaller guidance scale")
    if callback is not None:
        callback(i, t, x, x0)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm, "ddim": ddim}


def sample(eps_fn: EpsFn, noise: Tensor, schedule: Schedule, sampler: str = "ddim", steps: int = 50,
           generator: Optional[torch.Generator] = None, callback: Callback = None,
           spacing: str = "trailing", **options: float) -> Tensor:
    """Run ``sampler`` from x_T = ``noise`` for ``steps`` network evaluations and return x_0.

    ``eps_fn(x_t, t)`` takes a batch and a (B,) tensor of integer timesteps and returns ε̂; models
    that predict x0 or v are adapted with :meth:`Schedule.to_eps`. Options: ``eta`` (ddim),
    ``clip_x0`` (clamp x̂ to ±value, for pixel-space models on [-1, 1]).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    accepted = set(inspect.signature(SAMPLERS[sampler]).parameters) - {"eps_fn", "x", "schedule", "timesteps"}
    unknown = set(options) - accepted
    if unknown:
        raise UserError(f"sampler {sampler!r} takes no option(s) {', '.join(sorted(unknown))}")
    ts = timesteps_for(schedule, steps, spacing)
    with torch.no_grad():
        return SAMPLERS[sampler](eps_fn, noise, schedule, ts, generator, callback, **options)
