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

__all__ = ["SAMPLERS", "DETERMINISTIC", "ONE_STEP", "SPACINGS", "check_sampler_args", "Denoiser",
           "NonFiniteError", "as_eps_fn", "randn_cpu", "sample", "sigmas_for", "timesteps_for"]
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
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    else:
        noise = generator.randn(shape)
    if like.device.type == "cuda":  # pinned and asynchronous: the copy does not wait for the GPU's queue
        return noise.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return noise.to(like.device, like.dtype)


def _non_finite(i: int, s: float) -> NonFiniteError:
    return NonFiniteError(f"non-finite values at sampling step {i} (sigma {s:.4g}); "
                          "try fp32 or a smaller guidance scale")


class Monitor:
    """The per-step hook ``sample`` hands the samplers: it notes whether each step's state is finite without
    reading it back (no host sync per step on a GPU), passes the step on to the caller's hook, and
    :meth:`raise_first` (one sync, at the end) names the first step that went NaN/inf."""

    def __init__(self, hook: Hook = None, record: bool = True) -> None:
        self.hook, self.record = hook, record
        self.flags: list[Tensor] = []
        self.where: list[tuple[int, float]] = []

    def __call__(self, i: int, s: float, s_next: float, x: Tensor, x0: Tensor) -> None:
        if self.record:
            self.flags.append(torch.isfinite(x).all())  # a device tensor: nothing is read back here
            self.where.append((i, s))
        if self.hook is not None:
            self.hook(i, s, s_next, x, x0)

    def raise_first(self) -> None:
        """Raise NonFiniteError naming the first step whose state was not finite, if any."""
        if self.flags:
            ok = torch.stack(self.flags).cpu()  # the run's one read-back
            if not bool(ok.all()):
                raise _non_finite(*self.where[int((~ok).nonzero()[0])])
        self.flags, self.where = [], []


def _check(x: Tensor, i: int, s: float, s_next: float, hook: Hook, x0: Tensor) -> None:
    """Note NaN/inf (the black-image failure) for the step and report progress: under ``sample`` the hook
    is a Monitor, which checks without a host sync; a sampler called directly checks at once."""
    if isinstance(hook, Monitor):
        hook(i, s, s_next, x, x0)
        return
    if not bool(torch.isfinite(x).all()):
        raise _non_finite(i, s)
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


# A 3M SDE step spanning (1+η)h >= this in λ takes the 2M midpoint step instead: there the quadratic
# extrapolation of x̂ (and for η > 0 the re-injected noise it carries) overshoots. Gaussian certificate,
# 10 Karras steps: W2 1.32 -> 0.14 (diffusers' 3M SDE: 0.37); 25 and 100 steps are unchanged.
THIRD_ORDER_MAX_STEP = 2.0


def dpmpp_3m_sde(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
                 callback: Hook = None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE: D extrapolated quadratically from three steps; η = 0 is the 3M ODE solver.

    k-diffusion's form, except that a step of (1+η)h >= THIRD_ORDER_MAX_STEP is the 2M (SDE) midpoint step.
    """
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
                if len(x0s) >= 2 and he < THIRD_ORDER_MAX_STEP:
                    r0, r1 = hs[0] / h, hs[1] / h
                    d1_1 = (x0s[0] - x0s[1]) / r1
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + phi_2 * (d1_0 + d2 * r0) + (0.5 - phi_2 / he) * d2
                elif len(x0s) >= 2:  # a long step: dpmpp_2m_sde's midpoint form, 1/2 (1 - e^{-(1+η)h}) D1
                    x = x - 0.5 * math.expm1(-he) * d1_0
                else:
                    x = x + phi_2 * d1_0
            if eta > 0:
                x = x + s_next * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_cpu(x.shape, generator, x)
            hs = [h] + hs[:1]
        x0s = [x0] + x0s[:1]
        _check(x, i, s, s_next, callback, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun,
    "lms": lms, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde}
DETERMINISTIC: tuple[str, ...] = ("ddim", "euler", "heun", "lms", "dpmpp_2m", "dpm_adaptive")  # default options


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
           resample: int = 1, quantize: bool = False, **options: float) -> Tensor | tuple[Tensor, int]:
    """Run ``sampler`` for ``steps`` steps from x_T = ``noise`` and return x_0 (and the NFE if asked).

    ``eps_fn(x_t, t)`` takes a batch and a (B,) tensor of timesteps (long, or float off the integers) and
    returns ε̂; models
    that predict x0 or v are adapted with :func:`as_eps_fn`. ``spacing``: one of SPACINGS.
    ``clip_x0`` clamps x̂ to ±value (pixel-space models on [-1, 1]). Options: ``eta`` (ddim,
    euler_ancestral, dpmpp_*_sde), ``order`` (lms), ``rtol``/``atol``/``max_steps`` (dpm_adaptive),
    ``timestep_scaling`` (lcm).

    Image tasks: with ``init`` (clean data, same shape as ``noise``) the run is SDEdit img2img: only the
    last ``strength`` · steps steps run, from ``init`` noised by (20.8); strength 0 returns ``init``.
    With ``mask`` as well (1 = known, broadcastable to ``init``) it is inpainting by replacement: after
    every step the known region is replaced by ``init`` noised to the new level (exactly ``init`` at the
    end), and ``resample`` > 1 re-noises each step and repeats it (RePaint) to harmonise the seam.

    The network's time input is continuous (``Denoiser``): off the integer timesteps it gets fractional
    t; ``quantize=True`` rounds it to the nearest timestep (diffusers' DPMSolverMultistep with Karras σ).
    NaN/inf values stop the run with a NonFiniteError naming the first bad step, checked once at the end
    (no host sync per step).
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

    model = Denoiser(counted, schedule, clip_x0, quantize)
    hook = Monitor(None if callback is None else (
        lambda i, s, s_next, x, x0: callback(i, model.timestep(s), x * abar_from_sigma(s_next) ** 0.5, x0)))
    # x = z/√ᾱ: pure noise is z_T/√ᾱ_T; a noised image is init + σ ε, the σ view of (20.8)
    x = noise / abar_from_sigma(sigmas[0]) ** 0.5 if init is None else init + sigmas[0] * noise
    with torch.no_grad():
        if mask is None:
            x0 = fn(model, x, sigmas, generator, hook, **options)
        else:
            assert init is not None  # a mask without init was refused above
            x0 = _inpaint(fn, model, x, sigmas, init, mask.to(x), generator, hook, resample, options)
    hook.raise_first()
    return (x0, nfe) if return_nfe else x0


def _inpaint(fn: Callable[..., Tensor], model: Denoiser, x: Tensor, sigmas: list[float], known: Tensor,
             mask: Tensor, generator: Optional[torch.Generator | NoiseSource], hook: Hook, resample: int,
             options: dict) -> Tensor:
    """One sampler step at a time; after each, the known region is the known image at that noise level."""
    for i, s, s_next in _steps(sigmas):
        for r in range(resample):
            x = fn(model, x, [s, s_next], generator, Monitor(record=False), **options)  # checked below
            x = mask * (known + s_next * randn_cpu(x.shape, generator, x)) + (1 - mask) * x
            if r + 1 < resample:  # RePaint: back to σ_s with fresh forward noise, then step again
                x = x + (s**2 - s_next**2) ** 0.5 * randn_cpu(x.shape, generator, x)
        _check(x, i, s, s_next, hook, x)
    return x


# ---- the adaptive solver, few-step and more multistep solvers, in their own modules (they use the helpers above)
from latentdiff.diffusion.adaptive import dpm_adaptive  # noqa: E402
from latentdiff.diffusion.consistency import lcm  # noqa: E402
from latentdiff.diffusion.multistep import deis, unipc, unipc_bh2  # noqa: E402

SAMPLERS.update(dpm_adaptive=dpm_adaptive, lcm=lcm, unipc=unipc, unipc_bh2=unipc_bh2, deis=deis)
DETERMINISTIC += ("unipc", "unipc_bh2", "deis")
