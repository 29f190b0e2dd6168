"""Few-step models: Latent Consistency Model sampling (an LCM-distilled network or an LCM-LoRA)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from latentdiff.diffusion.samplers import Hook, _check, _steps, randn_cpu
from latentdiff.diffusion.schedule import abar_from_sigma
from latentdiff.diffusion.sigmas import Denoiser

LCM_SIGMA_DATA = 0.5  # σ_data of the consistency parameterisation (Song et al. 2023; diffusers' LCMScheduler)


def lcm(model: Denoiser, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
        callback: Hook = None, timestep_scaling: float = 10.0) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): denoise in one jump, re-noise to the next level.

    The consistency function is f(z_t) = c_skip(t) z_t + c_out(t) x̂ with c_skip = σ_d²/((s t)² + σ_d²) and
    c_out = s t/√((s t)² + σ_d²) (s = ``timestep_scaling``, σ_d = 0.5, t the discrete timestep), then
    z_s = √ᾱ_s f + √(1-ᾱ_s) n with fresh noise, which in the σ view is x_s = f + σ_s n (20.8). With an
    LCM-distilled network (or an LCM-LoRA) 2-8 steps on ``spacing="lcm"`` suffice.
    """
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        scaled = model.timestep(s) * timestep_scaling
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
        f = c_out * x0 + c_skip * x * abar_from_sigma(s) ** 0.5  # z_t = √ᾱ_t x
        x = f + s_next * randn_cpu(x.shape, generator, x) if s_next > 0 else f
        _check(x, i, s, s_next, callback, f)
    return x
