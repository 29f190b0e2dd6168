"""The σ view of a discrete schedule: step spacings and the denoiser D(x, σ) every sampler calls.

k-diffusion's (variance-exploding) view of a discrete VP schedule: σ_t = √((1-ᾱ_t)/ᾱ_t) and
x = z_t / √ᾱ_t, so (20.8) reads x = x_0 + σ ε and the probability-flow ODE is dx/dσ = (x - D(x, σ))/σ.
Samplers step on a descending grid σ_0 > … > σ_{N-1} > σ_N = 0 (the last step lands on clean data).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from latentdiff.diffusion.schedule import Schedule, abar_from_sigma, eps_to_x0_at
from latentdiff.errors import SettingError

EpsFn = Callable[[Tensor, Tensor], Tensor]
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace", "lcm")  # integer timesteps (diffusers' timestep_spacing)
SIGMA_SPACINGS = ("karras", "exponential")  # σ grids between the schedule's σ_min and σ_max
SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS
LCM_ORIGINAL_STEPS = 50  # the timesteps LCM was distilled on: (1..50) · T/50 - 1 (diffusers' original_inference_steps)
KARRAS_RHO = 7.0  # Karras et al. (2022) eq. 5; diffusers' use_karras_sigmas uses the same ρ


def check_grid(num_timesteps: int, steps: int, spacing: str) -> None:
    """Refuse a step count or a spacing no grid exists for, naming the setting (SettingError)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SettingError("steps", f"must be a positive integer, got {steps!r}")
    if spacing not in SPACINGS:
        raise SettingError("spacing", f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing == "lcm" and steps > LCM_ORIGINAL_STEPS:
        raise SettingError("steps", f"spacing lcm takes at most {LCM_ORIGINAL_STEPS} steps (LCM's distillation "
                                    f"timesteps), got {steps}")
    if spacing in TIMESTEP_SPACINGS and steps > num_timesteps:
        raise SettingError("steps", f"{steps} is more than the schedule's {num_timesteps} timesteps (spacing "
                                    f"{spacing}); use fewer steps or a sigma spacing (karras, exponential)")


def timesteps_for(schedule: Schedule, steps: int, spacing: str = "trailing", offset: int = 0) -> list[int]:
    """The descending integer timesteps a sampler visits (the spacings diffusers users know).

    'trailing' always starts at T-1 (the pure-noise end), which is why it is the default: 'leading'
    (Stable Diffusion's DDIM with ``offset=1``) never reaches the last timestep at few steps.
    """
    T = schedule.num_timesteps
    if spacing not in TIMESTEP_SPACINGS:
        raise SettingError("spacing", f"unknown timestep spacing {spacing!r}; choose one of "
                                      f"{', '.join(TIMESTEP_SPACINGS)}")
    check_grid(T, steps, spacing)
    if spacing == "trailing":
        ts = [round(T - 1 - i * T / steps) for i in range(steps)]
    elif spacing == "leading":
        ts = [i * (T // steps) + offset for i in range(steps)][::-1]
    elif spacing == "lcm":  # evenly spaced picks from LCM's distillation timesteps, as diffusers' LCMScheduler
        n = min(LCM_ORIGINAL_STEPS, T)
        ts = [(n - i * n // steps) * (T // n) - 1 for i in range(steps)]
    else:  # linspace
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return [min(max(t, 0), T - 1) for t in ts]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """σ evenly spaced in log σ (equal steps in log-SNR) from σ_max to σ_min, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    log_sig = math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))
    return torch.cat([log_sig.exp(), torch.zeros(1, dtype=torch.float64)])


def sigmas_for(schedule: Schedule, steps: int, spacing: str = "trailing") -> Tensor:
    """The descending σ grid (``steps`` + 1 values, float64, the last one 0) of a named spacing.

    Timestep spacings give σ of their integer timesteps, so the model is evaluated exactly where it
    was trained; 'karras' and 'exponential' span [σ_min, σ_max] of the schedule (σ at t = 0 and T-1).
    """
    check_grid(schedule.num_timesteps, steps, spacing)
    if spacing in SIGMA_SPACINGS:
        lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
        return karras_sigmas(steps, lo, hi) if spacing == "karras" else exponential_sigmas(steps, lo, hi)
    ts = timesteps_for(schedule, steps, spacing)
    return torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])


class Denoiser:
    """D(x, σ) = x̂: the discrete ε-model of ``schedule`` seen from the σ view (k-diffusion's wrapper).

    σ is mapped to the *nearest* discrete timestep in log σ, because the ε-model takes integer
    timesteps: exact on timestep spacings, and the same rounding as diffusers' DPMSolverMultistep with
    Karras sigmas (and k-diffusion with ``quantize=True``). Interpolating t in log σ would need
    fractional timesteps, which the ε-model contract excludes. ``clip_x0`` clamps x̂ (pixel models).
    """

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, clip_x0: Optional[float] = None) -> None:
        self.eps_fn, self.clip_x0 = eps_fn, clip_x0
        self.log_sigmas = schedule.sigmas.log()
        self.sigma_min, self.sigma_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])

    def timestep(self, sigma: float) -> int:
        """The discrete timestep whose σ_t is nearest to σ in log σ."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.long, device=x.device)
        abar = abar_from_sigma(sigma)
        z_t = x * abar**0.5  # the VP latent the ε-model reads: x = z_t/√ᾱ
        x0 = eps_to_x0_at(z_t, self.eps_fn(z_t, t), abar)  # the inverse of (20.8); in σ terms x - σ ε̂
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)
