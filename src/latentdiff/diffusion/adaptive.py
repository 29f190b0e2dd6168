"""DPM adaptive (k-diffusion's ``sample_dpm_adaptive``): embedded DPM-Solver-2/3 steps in λ = -log σ with an
error-controlled step size, in the σ view of samplers.py (x = z_t/√ᾱ_t, so (20.8) reads x = x̂ + σ ε̂).
Registered in samplers.SAMPLERS."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from latentdiff.diffusion.samplers import Hook, _check, _non_finite
from latentdiff.diffusion.sigmas import Denoiser
from latentdiff.errors import UserError


def _dpm_23(model: Callable[[Tensor, float], Tensor], x: Tensor, s: float, s_next: float,
            eps: Tensor) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 (r₁ = 1/3) and DPM-Solver-3 (Lu et al. 2022, alg. 2) from σ = s to s_next, 2 NFE."""
    h = math.log(s / s_next)
    s1, s2 = s * math.exp(-h / 3), s * math.exp(-2 * h / 3)
    u1 = x - s1 * math.expm1(h / 3) * eps
    e1 = (u1 - model(u1, s1)) / s1 - eps  # ε at λ + h/3, minus ε at λ
    x_low = x - s_next * math.expm1(h) * eps - s_next * 1.5 * math.expm1(h) * e1
    u2 = x - s2 * math.expm1(2 * h / 3) * eps - s2 * 2 * (math.expm1(2 * h / 3) / (2 * h / 3) - 1) * e1
    e2 = (u2 - model(u2, s2)) / s2 - eps
    x_high = x - s_next * math.expm1(h) * eps - s_next * 1.5 * (math.expm1(h) / h - 1) * e2
    return x_low, x_high


def dpm_adaptive(model: Denoiser, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                 callback: Hook = None, rtol: float = 1e-3, atol: float = 1e-3, h_init: float = 0.05,
                 max_steps: int = 1000) -> Tensor:
    """DPM adaptive (k-diffusion's controller): embedded DPM-Solver-2/3 steps in λ, the step set by their difference.

    Integrates from σ = ``sigmas[0]`` to the schedule's σ_min, then denoises (x̂ at σ_min, 1 NFE); the rest
    of the grid is ignored (as in the web UIs), so the step count does not change the result. The first
    step is ``h_init`` in λ = -log σ; each tried step costs 2 NFE, plus 1 per accepted step. The error is
    measured on the VP scale z = x/√(1+σ²) (data scale, where ``atol`` means something at every σ): RMS of
    (z₂ - z₃)/max(atol, rtol·|z|) ≤ 1 with k-diffusion's accept safety 0.81. The defaults put the
    certificate's error at its noise floor (docs/samplers.md); the web UIs' (0.05, 0.0078) are far looser.
    """
    if rtol < 0 or atol <= 0 or h_init <= 0:
        raise UserError(f"dpm_adaptive needs rtol >= 0, atol > 0 and h_init > 0, got rtol={rtol}, atol={atol}, "
                        f"h_init={h_init}")
    s, s_end = sigmas[0], model.sigma_min
    h, i, tried = h_init, 0, 0
    z_prev = x / (1 + s**2) ** 0.5
    x0 = model(x, s)
    while s > s_end * (1 + 1e-9):
        tried += 1
        if tried > max_steps:
            raise UserError(f"dpm_adaptive took more than max_steps={max_steps} steps; loosen rtol/atol")
        s_next = max(s * math.exp(-h), s_end)
        x_low, x_high = _dpm_23(model, x, s, s_next, (x - x0) / s)
        vp = (1 + s_next**2) ** -0.5  # x = z/√ᾱ: back to the data scale
        delta = torch.maximum(x_low.abs() * vp, z_prev.abs()).mul(rtol).clamp(min=atol)
        err = float(((x_low - x_high) * vp / delta).pow(2).mean().sqrt())  # the controller's one read-back
        if not math.isfinite(err):
            raise _non_finite(i, s)
        factor = 1 + math.atan(max(err, 1e-8) ** (-1 / 3) - 1)  # k-diffusion's limited I-controller
        if factor >= 0.81:  # accept
            z_prev, x = x_low * vp, x_high
            _check(x, i, s, s_next, callback, x0)
            s, i = s_next, i + 1
            x0 = model(x, s)
        h *= factor
    _check(x0, i, s, 0.0, callback, x0)
    return x0
