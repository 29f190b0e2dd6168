"""Samplers: short pure functions over a denoiser and a σ grid, and the one public ``sample``.

Every sampler has the signature ``(model, x, sigmas, generator, callback, **opts)``: ``model(x, σ)`` is
the denoiser D of :class:`~latentdiff.diffusion.sigmas.Denoiser` (x = z_t/√ᾱ_t, the σ view), ``sigmas``
a descending list ending in 0. No sampler keeps state between calls, so one harness
(tests/test_samplers.py) checks them all against data whose exact denoiser is known in closed form.
Names and their diffusers / web-UI equivalents: docs/samplers.md.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Optional, Protocol

import numpy as np
from numpy.polynomial import polynomial as P
import torch
from torch import Tensor

from latentdiff.diffusion.schedule import Schedule, abar_from_sigma, posterior_between
from latentdiff.diffusion.sigmas import SPACINGS, Denoiser, EpsFn, sigmas_for, timesteps_for
from latentdiff.errors import SettingError, UserError

__all__ = ["SAMPLERS", "DETERMINISTIC", "ONE_STEP", "SPACINGS", "check_sampler_args", "Denoiser", "NonFiniteError", "as_eps_fn", "randn_cpu", "sample",
           "sigmas_for", "timesteps_for"]
# callback(i, t, x_t, x0_pred): called once per step with the nearest timestep t, the VP latent z_t
# after the step and the step's x̂, e.g. for progress bars and x0 previews.
Callback = Optional[Callable[[int, int, Tensor, Tensor], None]]
# what samplers call instead: hook(i, σ_i, σ_{i+1}, x after the step, x̂)
Hook = Optional[Callable[[int, float, float, Tensor, Tensor], None]]
Model = Callable[[Tensor, float], Tensor]


class NoiseSource(Protocol):
    """Standard normal noise of a shape, from wherever the caller draws it (per-sample seeds, one generator)."""

    def randn(self, shape: tuple[int, ...]) -> Tensor: ...


class NonFiniteError(UserError):
    """The sampler produced NaN or inf values; the message names the step."""


def as_eps_fn(model_fn: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, prediction: str) -> EpsFn:
    """Adapt a network that predicts ε, x0 or v to the ε-predictor every sampler takes."""
    if prediction == "eps":
        return model_fn
    return lambda x, t: schedule.to_eps(model_fn(x, t), x, t, prediction)


def randn_cpu(shape: tuple[int, ...], generator: Optional[torch.Generator | NoiseSource], like: Tensor) -> Tensor:
    """Standard normal noise drawn on the CPU, so a seed gives the same image on any device.

    ``generator`` is a torch.Generator, None (global RNG), or any object with ``randn(shape)`` (such as
    the pipelines' per-sample noise, which keeps each image independent of the batch it is drawn in).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)
    return generator.randn(shape).to(like.device, like.dtype)


def _check(x: Tensor, i: int, s: float, s_next: float, hook: Hook, x0: Tensor) -> None:
    """Stop with the step number on NaN/inf (the black-image failure), then report progress."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"non-finite values at sampling step {i} (sigma {s:.4g}); "
                             "try fp32 or a smaller guidance scale")
    if hook is not None:
        hook(i, s, s_next, x, x0)


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise SettingError("eta", f"must be >= 0, got {eta}")


def _steps(sigmas: list[float]) -> list[tuple[int, float, float]]:
    return [(i, sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1)]


# ---- the two discrete-time samplers of the book ---------------------------------------------------
def ddpm(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
         callback: Hook = None) -> Tensor:
    """Ancestral sampling: z_s ~ q(z_s | z_t, x̂), the posterior (20.13)–(20.15) with x replaced by x̂."""
    for i, s, s_next in _steps(sigmas):
        a_t, a_s = abar_from_sigma(s), abar_from_sigma(s_next)
        x0 = model(x, s)
        mean, var = posterior_between(x0, x * a_t**0.5, a_t, a_s)  # on z_t = √ᾱ_t x
        z = mean + var.sqrt() * randn_cpu(x.shape, generator, x) if s_next > 0 else mean
        x = z / a_s**0.5
        _check(x, i, s, s_next, callback, x0)
    return x


def ddim(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
         callback: Hook = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021): x_s = x̂ + √(σ_s² - v) ε̂ + √v n, η=0 deterministic, η=1 ≡ ddpm."""
    _check_eta(eta)
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        eps = (x - x0) / s
        # v = η² σ_s² (σ_t² - σ_s²)/σ_t²: DDIM's η² × the posterior variance (20.15), divided by ᾱ_s
        var = eta**2 * s_next**2 * (s**2 - s_next**2) / s**2
        x = x0 + max(s_next**2 - var, 0.0) ** 0.5 * eps
        if var > 0:
            x = x + var**0.5 * randn_cpu(x.shape, generator, x)
        _check(x, i, s, s_next, callback, x0)
    return x


# ---- k-diffusion samplers in the σ view -------------------------------------------------------------
def euler(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
          callback: Hook = None) -> Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x - D)/σ; the same map as DDIM with η = 0."""
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        x = x + (s_next - s) * (x - x0) / s
        _check(x, i, s, s_next, callback, x0)
    return x


def euler_ancestral(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                    callback: Hook = None, eta: float = 1.0) -> Tensor:
    """Euler down to σ_down, then fresh noise of σ_up (σ_down² + σ_up² = σ_s²); η = 1 is ddpm's chain."""
    _check_eta(eta)
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        x = x + (down - s) * (x - x0) / s
        if s_next > 0 and up > 0:
            x = x + up * randn_cpu(x.shape, generator, x)
        _check(x, i, s, s_next, callback, x0)
    return x


def heun(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
         callback: Hook = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, alg. 1): Euler, then the mean of both slopes; 2N-1 NFE."""
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        d = (x - x0) / s
        if s_next == 0:  # the last step is Euler: D at σ = 0 is not defined
            x = x0
        else:
            x_2 = x + (s_next - s) * d
            x = x + (s_next - s) * (d + (x_2 - model(x_2, s_next)) / s_next) / 2
        _check(x, i, s, s_next, callback, x0)
    return x


def _lms_coeff(sig: list[float], i: int, j: int, order: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis ℓ_j through σ_i, σ_{i-1}, …, σ_{i-order+1}, exactly."""
    h = sig[i + 1] - sig[i]
    u = [(sig[i - k] - sig[i]) / h for k in range(order)]  # nodes in u = (σ - σ_i)/h: well conditioned
    others = [u[k] for k in range(order) if k != j]
    basis = P.polyfromroots(others) / np.prod([u[j] - o for o in others])
    return h * float(P.polyval(1.0, P.polyint(basis)))


def lms(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
        callback: Hook = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams–Bashforth in σ) on dx/dσ = (x - D)/σ, over up to ``order`` past slopes."""
    if not isinstance(order, int) or order < 1:
        raise UserError(f"order must be a positive integer, got {order!r}")
    ds: list[Tensor] = []
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        ds = [(x - x0) / s] + ds[: order - 1]  # newest first
        x = x + sum(_lms_coeff(sigmas, i, j, len(ds)) * d for j, d in enumerate(ds))
        _check(x, i, s, s_next, callback, x0)
    return x


def dpmpp_2m(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
             callback: Hook = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): exact in λ = -log σ for the linear part, D extrapolated linearly."""
    old_x0, h_last = None, 0.0
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        h = math.log(s / s_next) if s_next > 0 else math.inf  # λ_next - λ
        # D at the step's midpoint in λ, extrapolated from the last two x̂ (diffusers' 'midpoint');
        # the first step and the step to σ = 0 are first order (DDIM)
        d = x0 if old_x0 is None or s_next == 0 else x0 + h / (2 * h_last) * (x0 - old_x0)
        x = (s_next / s) * x - math.expm1(-h) * d
        old_x0, h_last = x0, h
        _check(x, i, s, s_next, callback, x0)
    return x


def dpmpp_2m_sde(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                 callback: Hook = None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE: the 2M step with noise injected at rate η; η = 0 is dpmpp_2m."""
    _check_eta(eta)
    old_x0, h_last = None, 0.0
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            g = -math.expm1(-h - eta * h)  # 1 - e^{-(1+η)h}
            x = (s_next / s) * math.exp(-eta * h) * x + g * x0
            if old_x0 is not None:
                x = x + 0.5 * g * (h / h_last) * (x0 - old_x0)
            if eta > 0:
                x = x + s_next * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_cpu(x.shape, generator, x)
            h_last = h
        old_x0 = x0
        _check(x, i, s, s_next, callback, x0)
    return x


def dpmpp_3m_sde(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                 callback: Hook = None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE: D extrapolated quadratically from three steps; η = 0 is the 3M ODE solver."""
    _check_eta(eta)
    x0s: list[Tensor] = []  # newest first
    hs: list[float] = []
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            he = h * (eta + 1)
            phi_2 = math.expm1(-he) / he + 1
            x = math.exp(-he) * x - math.expm1(-he) * x0
            if len(x0s) >= 1:
                d1_0 = (x0 - x0s[0]) * (h / hs[0])
                if len(x0s) >= 2:
                    r0, r1 = hs[0] / h, hs[1] / h
                    d1_1 = (x0s[0] - x0s[1]) / r1
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + phi_2 * (d1_0 + d2 * r0) - (phi_2 / he - 0.5) * d2
                else:
                    x = x + phi_2 * d1_0
            if eta > 0:
                x = x + s_next * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_cpu(x.shape, generator, x)
            hs = [h] + hs[:1]
        x0s = [x0] + x0s[:1]
        _check(x, i, s, s_next, callback, x0)
    return x


# ---- few-step models ------------------------------------------------------------------------------
LCM_SIGMA_DATA = 0.5  # σ_data of the consistency parameterisation (Song et al. 2023; diffusers' LCMScheduler)


def lcm(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
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


# ---- adaptive -------------------------------------------------------------------------------------
def _dpm_23(model: Model, x: Tensor, s: float, s_next: float, eps: Tensor) -> tuple[Tensor, Tensor]:
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


def dpm_adaptive(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                 callback: Hook = None, rtol: float = 0.05, atol: float = 0.0078, max_steps: int = 1000) -> Tensor:
    """DPM adaptive (k-diffusion): embedded DPM-Solver-2/3 steps in λ, the step set by their difference.

    Integrates from σ = ``sigmas[0]`` to the schedule's σ_min, then denoises (x̂ at σ_min, 1 NFE). The
    grid's length sets only the first step, (λ_min - λ_max)/steps; each tried step costs 2 NFE, plus
    1 per accepted step. Error per step: RMS of (x₂ - x₃)/max(atol, rtol·|x|) ≤ 1 (accept_safety 0.81).
    """
    if rtol < 0 or atol <= 0:
        raise UserError(f"dpm_adaptive needs rtol >= 0 and atol > 0, got rtol={rtol}, atol={atol}")
    s, s_end = sigmas[0], model.sigma_min
    h = math.log(s / s_end) / (len(sigmas) - 1)
    x_prev, i, tried = x, 0, 0
    x0 = model(x, s)
    while s > s_end * (1 + 1e-9):
        tried += 1
        if tried > max_steps:
            raise UserError(f"dpm_adaptive took more than max_steps={max_steps} steps; loosen rtol/atol")
        s_next = max(s * math.exp(-h), s_end)
        x_low, x_high = _dpm_23(model, x, s, s_next, (x - x0) / s)
        delta = torch.maximum(x_low.abs(), x_prev.abs()).mul(rtol).clamp(min=atol)
        err = float(((x_low - x_high) / delta).pow(2).mean().sqrt())
        _check(x.new_tensor(err), i, s, s_next, None, x0)  # NaN/inf in the model's output stops here
        factor = 1 + math.atan(max(err, 1e-8) ** (-1 / 3) - 1)  # k-diffusion's limited I-controller
        if factor >= 0.81:  # accept
            x_prev, x = x_low, x_high
            _check(x, i, s, s_next, callback, x0)
            s, i = s_next, i + 1
            x0 = model(x, s)
        h *= factor
    _check(x0, i, s, 0.0, callback, x0)
    return x0


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun,
    "lms": lms, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpm_adaptive": dpm_adaptive, "lcm": lcm}
DETERMINISTIC = ("ddim", "euler", "heun", "lms", "dpmpp_2m", "dpm_adaptive")  # with default options


ONE_STEP = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "lcm")  # no history: can be driven step by step


def check_sampler_args(sampler: str, options: Mapping[str, float], strength: float = 1.0, resample: int = 1,
                       replace: bool = False, name: Optional[str] = None) -> None:
    """Refuse an unknown sampler, options it does not take, and image-task values out of range, naming the
    setting; ``replace``: inpainting by replacement, which steps the sampler one step at a time. ``name``:
    what the caller called the sampler, for the message."""
    if sampler not in SAMPLERS:
        raise SettingError("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    takes = set(inspect.signature(SAMPLERS[sampler]).parameters) - {"model", "x", "sigmas", "generator", "callback"}
    unknown = set(options) - takes
    if unknown:
        raise SettingError("sampler", f"{sampler!r} takes no option(s) {', '.join(sorted(unknown))}")
    bad = {k: v for k, v in options.items()
           if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 <= v < float("inf"))}
    if bad:
        raise SettingError(sorted(bad)[0], f"sampler options must be finite numbers >= 0, got {bad}")
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise SettingError("strength", f"must be in [0, 1], got {strength!r}")
    if not isinstance(resample, int) or isinstance(resample, bool) or resample < 1:
        raise SettingError("resample", f"must be a positive integer, got {resample!r}")
    if replace and sampler not in ONE_STEP:
        raise SettingError("sampler", f"inpainting by replacement steps the sampler one step at a time; "
                                      f"{name or sampler!r} cannot; choose one of {', '.join(ONE_STEP)}")


def sample(eps_fn: EpsFn, noise: Tensor, schedule: Schedule, sampler: str = "ddim", steps: int = 50,
           generator: Optional[torch.Generator | NoiseSource] = None, callback: Callback = None,
           spacing: str = "trailing", clip_x0: Optional[float] = None, return_nfe: bool = False,
           init: Optional[Tensor] = None, strength: float = 1.0, mask: Optional[Tensor] = None,
           resample: int = 1, **options: float) -> Tensor | tuple[Tensor, int]:
    """Run ``sampler`` for ``steps`` steps from x_T = ``noise`` and return x_0 (and the NFE if asked).

    ``eps_fn(x_t, t)`` takes a batch and a (B,) long tensor of integer timesteps and returns ε̂; models
    that predict x0 or v are adapted with :func:`as_eps_fn`. ``spacing``: one of SPACINGS.
    ``clip_x0`` clamps x̂ to ±value (pixel-space models on [-1, 1]). Options: ``eta`` (ddim,
    euler_ancestral, dpmpp_*_sde), ``order`` (lms), ``rtol``/``atol``/``max_steps`` (dpm_adaptive),
    ``timestep_scaling`` (lcm).

    Image tasks: with ``init`` (clean data, same shape as ``noise``) the run is SDEdit img2img: only the
    last ``strength`` · steps steps run, from ``init`` noised by (20.8); strength 0 returns ``init``.
    With ``mask`` as well (1 = known, broadcastable to ``init``) it is inpainting by replacement: after
    every step the known region is replaced by ``init`` noised to the new level (exactly ``init`` at the
    end), and ``resample`` > 1 re-noises each step and repeats it (RePaint) to harmonise the seam.
    """
    check_sampler_args(sampler, options, strength, resample, replace=mask is not None)
    if mask is not None and init is None:
        raise UserError("inpainting needs the known image (init) beside the mask")
    fn = SAMPLERS[sampler]
    sigmas = sigmas_for(schedule, steps, spacing).tolist()
    if init is not None:
        run = round(strength * steps)
        if run == 0:
            return (init.clone(), 0) if return_nfe else init.clone()
        sigmas = sigmas[steps - run:]
    nfe = 0

    def counted(z: Tensor, t: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return eps_fn(z, t)

    model = Denoiser(counted, schedule, clip_x0)
    hook = None if callback is None else (
        lambda i, s, s_next, x, x0: callback(i, model.timestep(s), x * abar_from_sigma(s_next) ** 0.5, x0))
    # x = z/√ᾱ: pure noise is z_T/√ᾱ_T; a noised image is init + σ ε, the σ view of (20.8)
    x = noise / abar_from_sigma(sigmas[0]) ** 0.5 if init is None else init + sigmas[0] * noise
    with torch.no_grad():
        if mask is None:
            x0 = fn(model, x, sigmas, generator, hook, **options)
        else:
            x0 = _inpaint(fn, model, x, sigmas, init, mask.to(x), generator, hook, resample, options)
    return (x0, nfe) if return_nfe else x0


def _inpaint(fn: Callable[..., Tensor], model: Denoiser, x: Tensor, sigmas: list[float], known: Tensor,
             mask: Tensor, generator: Optional[torch.Generator | NoiseSource], hook: Hook, resample: int,
             options: dict) -> Tensor:
    """One sampler step at a time; after each, the known region is the known image at that noise level."""
    for i, s, s_next in _steps(sigmas):
        for r in range(resample):
            x = fn(model, x, [s, s_next], generator, None, **options)
            x = mask * (known + s_next * randn_cpu(x.shape, generator, x)) + (1 - mask) * x
            if r + 1 < resample:  # RePaint: back to σ_s with fresh forward noise, then step again
                x = x + (s**2 - s_next**2) ** 0.5 * randn_cpu(x.shape, generator, x)
        _check(x, i, s, s_next, hook, x)
    return x
