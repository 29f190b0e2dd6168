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

from latentdiff.diffusion.schedule import Schedule, abar_from_sigma, eps_to_x0_at, interp_log_sigma
from latentdiff.errors import SettingError

EpsFn = Callable[[Tensor, Tensor], Tensor]
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace", "lcm")  # integer timesteps (diffusers' timestep_spacing)
SIGMA_SPACINGS = ("karras", "exponential", "ays", "fitted")  # σ grids between the schedule's σ_min and σ_max
SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS
LCM_ORIGINAL_STEPS = 50  # the timesteps LCM was distilled on: (1..50) · T/50 - 1 (diffusers' original_inference_steps)
KARRAS_RHO = 7.0  # Karras et al. (2022) eq. 5; diffusers' use_karras_sigmas uses the same ρ
# Align Your Steps (Sabour et al. 2024, Table 3): the 10-step σ grid optimised for Stable Diffusion 1.5, whose
# schedule is scaled_linear; its last value is SD's σ_min, where sampling ends (replaced by 0 here)
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
# A 10-step grid fitted on the sampler certificate (Gaussian and mixture data, exact denoiser, linear schedule):
# u_k = log(σ_max/σ_k) / log(σ_max/σ_min), from benchmarks/fit_sigma_grid.py; other step counts interpolate it
FITTED_LOG_FRACTIONS = (0.0, 0.0466, 0.1933, 0.3857, 0.4371, 0.4753, 0.5577, 0.6753, 0.7035, 0.813, 1.0)


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
                                    f"{spacing}); use fewer steps or a sigma spacing ({', '.join(SIGMA_SPACINGS)})")


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


def loglinear_resample(sigmas: Tensor, steps: int) -> Tensor:
    """A descending grid of K values stretched to ``steps`` + 1: log σ interpolated linearly over the grid's
    index (AYS's recipe for other step counts), the last value then set to 0 (the step onto clean data)."""
    log_s = sigmas.double().log()
    pos = torch.linspace(0, len(log_s) - 1, steps + 1, dtype=torch.float64)
    out = interp_log_sigma(log_s, pos).exp()
    out[-1] = 0.0
    return out


def time_at_sigma(log_sigmas: Tensor, sigma: float) -> float:
    """t(σ): the timestep index interpolated linearly in log σ (clamped to [0, T-1]); interp_log_sigma inverted."""
    T = len(log_sigmas)
    i = int(torch.searchsorted(log_sigmas, torch.tensor([math.log(sigma)], dtype=log_sigmas.dtype)).clamp(1, T - 1))
    w = (math.log(sigma) - float(log_sigmas[i - 1])) / float(log_sigmas[i] - log_sigmas[i - 1])
    return min(max(i - 1 + w, 0.0), T - 1.0)


def ays_sigmas(schedule: Schedule, steps: int) -> Tensor:
    """Align Your Steps' SD-1.5 grid carried to ``schedule`` at the same fraction of the time axis, then 0.

    Each published σ is SD's σ at a (fractional) timestep; this schedule's σ at that fraction of its own
    timesteps takes its place, so a scaled_linear schedule gets the published values back. Other step
    counts: loglinear_resample, as the AYS authors recommend.
    """
    sd = Schedule.from_name("scaled_linear").sigmas.log()
    frac = torch.tensor([time_at_sigma(sd, s) / (len(sd) - 1) for s in AYS_SD15_SIGMAS], dtype=torch.float64)
    own = schedule.sigmas.double().log()
    return loglinear_resample(interp_log_sigma(own, frac * (len(own) - 1)).exp(), steps)


def fitted_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The certificate-fitted grid (FITTED_LOG_FRACTIONS) on [σ_min, σ_max], stretched to ``steps``, then 0."""
    u = torch.tensor(FITTED_LOG_FRACTIONS, dtype=torch.float64)
    return loglinear_resample((math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max))).exp(), steps)


def sigmas_for(schedule: Schedule, steps: int, spacing: str = "trailing") -> Tensor:
    """The descending σ grid (``steps`` + 1 values, float64, the last one 0) of a named spacing.

    Timestep spacings give σ of their integer timesteps, so the model is evaluated exactly where it
    was trained; the σ spacings span [σ_min, σ_max] of the schedule (σ at t = 0 and T-1): 'karras' (Karras
    et al. eq. 5), 'exponential' (even in log σ), 'ays' (Align Your Steps' SD-1.5 grid) and 'fitted' (fitted
    on the sampler certificate, benchmarks/fit_sigma_grid.py).
    """
    check_grid(schedule.num_timesteps, steps, spacing)
    if spacing == "ays":
        return ays_sigmas(schedule, steps)
    if spacing in SIGMA_SPACINGS:
        lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
        if spacing == "fitted":
            return fitted_sigmas(steps, lo, hi)
        return karras_sigmas(steps, lo, hi) if spacing == "karras" else exponential_sigmas(steps, lo, hi)
    ts = timesteps_for(schedule, steps, spacing)
    return torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])


class Denoiser:
    """D(x, σ) = x̂: the discrete ε-model of ``schedule`` seen from the σ view (k-diffusion's wrapper).

    The network's time input is continuous: σ maps to t(σ), the timestep index interpolated linearly in
    log σ between the schedule's neighbours (k-diffusion's ``sigma_to_t``, diffusers' ``_sigma_to_t``), so
    any σ grid is evaluated where it asks; on a timestep spacing t(σ) is that integer timestep, passed as
    a long tensor as before. ``quantize=True`` rounds t(σ) to the nearest timestep instead (k-diffusion's
    ``quantize``; what diffusers' DPMSolverMultistep does with Karras sigmas), which leaves an error
    floor where σ and the timestep disagree. ``clip_x0`` clamps x̂ (pixel models).
    """

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, clip_x0: Optional[float] = None,
                 quantize: bool = False) -> None:
        self.eps_fn, self.clip_x0, self.quantize = eps_fn, clip_x0, quantize
        self.log_sigmas = schedule.sigmas.log()
        self.sigma_min, self.sigma_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])

    def timestep(self, sigma: float) -> int:
        """The discrete timestep whose σ_t is nearest to σ in log σ."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def time(self, sigma: float) -> float:
        """t(σ): the timestep index interpolated linearly in log σ (clamped to [0, T-1])."""
        return time_at_sigma(self.log_sigmas, sigma)

    def time_input(self, sigma: float, x: Tensor) -> Tensor:
        """The (B,) time input of the network at σ: long where t(σ) is an integer (or quantized), else float."""
        t = self.timestep(sigma) if self.quantize else self.time(sigma)
        if abs(t - round(t)) < 1e-6:
            return torch.full((x.shape[0],), round(t), dtype=torch.long, device=x.device)
        return torch.full((x.shape[0],), t, dtype=x.dtype if x.dtype == torch.float64 else torch.float32,
                          device=x.device)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        abar = abar_from_sigma(sigma)
        z_t = x * abar**0.5  # the VP latent the ε-model reads: x = z_t/√ᾱ
        x0 = eps_to_x0_at(z_t, self.eps_fn(z_t, self.time_input(sigma, x)), abar)  # (20.8) inverted: x - σ ε̂
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)
