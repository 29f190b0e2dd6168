"""Noise schedules and the closed-form Gaussian algebra of the forward process (DESIGN.md, ch. 20).

Index convention: timestep index ``t`` runs over 0 … T-1 and stands for Bishop's t+1, so
``alphas_cumprod[0]`` is ᾱ_1. This is the convention of DDPM, CompVis and diffusers, which keeps
Stable Diffusion's timesteps valid as they are. Tables are kept in float64 and cast on use.
"""

from __future__ import annotations

import copy
import math
import torch
from torch import Tensor

from latentdiff.errors import UserError

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "x0", "v")


def _expand(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Pick values[t] per sample and shape them to broadcast against ``like`` (B, ...)."""
    t = torch.as_tensor(t, device=values.device).long().reshape(-1)
    out = values[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def interp_log_sigma(log_sigmas: Tensor, t: Tensor) -> Tensor:
    """log σ at (fractional) timesteps t: linear between the table's neighbours (k-diffusion's t_to_sigma)."""
    t = t.double().clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - lo
    return (1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]


def _as_batch(a: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample (B,) value against ``like``."""
    a = torch.as_tensor(a, device=like.device, dtype=like.dtype)
    return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a


def betas_for(name: str, num_timesteps: int, beta_start: float | None = None,
              beta_end: float | None = None) -> Tensor:
    """β_1 … β_T of a named schedule, float64."""
    if num_timesteps < 2:
        raise UserError(f"num_timesteps must be >= 2, got {num_timesteps}")
    T = num_timesteps
    if name == "linear":  # DDPM (Ho et al. 2020): β from 1e-4 to 0.02 over 1000 steps
        lo, hi = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if name == "scaled_linear":  # Stable Diffusion: linear in √β from √0.00085 to √0.012
        lo, hi = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2
    if name == "cosine":  # improved DDPM (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)  # β_t = 1 - ᾱ_t / ᾱ_{t-1}, clipped as the paper
    raise UserError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


class Schedule:
    """A discrete noise schedule: β_t, ᾱ_t and everything the forward and reverse processes need."""

    def __init__(self, betas: Tensor, name: str = "custom") -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("betas must be a 1-D tensor with every value in (0, 1)")
        self.betas, self.name = betas, name
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (20.7) ᾱ_t = ∏_{τ≤t} (1 - β_τ)
        self._lookup: dict[str, tuple[Tensor, Tensor]] = {}  # device -> (ᾱ_t, log σ_t) there, see _tables

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kwargs: float) -> "Schedule":
        """Build a named schedule: 'linear', 'cosine' or 'scaled_linear'."""
        return cls(betas_for(name, num_timesteps, **kwargs), name)

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, T={self.num_timesteps}, abar_T={float(self.alphas_cumprod[-1]):.3g})"

    def to(self, device: torch.device | str) -> "Schedule":
        """This schedule with its tables on ``device``: a trainer on a GPU indexes them there, with no host
        round trip per step (the CPU schedule itself is returned for the CPU)."""
        if torch.device(device).type == "cpu":
            return self
        moved = copy.copy(self)
        moved.betas, moved.alphas_cumprod = self.betas.to(device), self.alphas_cumprod.to(device)
        return moved

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t): the noise-to-signal ratio, the continuous (k-diffusion) view."""
        a = self.alphas_cumprod
        return ((1 - a) / a).sqrt()

    @property
    def log_snr(self) -> Tensor:
        """log SNR(t) = log(ᾱ_t / (1-ᾱ_t))."""
        a = self.alphas_cumprod
        return (a / (1 - a)).log()

    def abar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ at timesteps t, shaped to broadcast against ``like``: the table at integers; between them the
        network's continuous time input, log σ interpolated linearly (the inverse of Denoiser's σ -> t), and
        ᾱ = 1/(1+σ²) since σ² = (1-ᾱ)/ᾱ in (20.8)."""
        t = torch.as_tensor(t)
        abar, log_sigmas = self._tables(t.device)  # where t is: no copy of t back to the host per step
        if not t.is_floating_point():
            return _expand(abar, t, like)
        sigma = interp_log_sigma(log_sigmas, t.to(log_sigmas.device).reshape(-1)).exp()
        return (1 / (1 + sigma**2)).to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(ᾱ_t, log σ_t) in float64 on a CUDA ``device`` (copied there once, then cached), else on the CPU:
        a sampler's per-step lookups for a v or x0 model then index on the GPU without a host sync."""
        key = str(device) if device.type == "cuda" else "cpu"  # MPS has no float64: look up on the CPU there
        if key not in self._lookup:
            abar = self.alphas_cumprod.to(key)
            self._lookup[key] = abar, ((1 - abar) / abar).sqrt().log()
        return self._lookup[key]

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1-ᾱ_t) for integer timesteps t, float64."""
        a = self.alphas_cumprod[torch.as_tensor(t).long().to(self.alphas_cumprod.device)]
        return a / (1 - a)

    # ---- forward process -------------------------------------------------------------------
    def q_step_sample(self, z_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One forward step, (20.3)/(20.4): z_t = √(1-β_t) z_{t-1} + √β_t ε_t."""
        beta = _expand(self.betas, t, z_prev)
        return (1 - beta).sqrt() * z_prev + beta.sqrt() * noise

    def q_sample(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample the diffusion kernel (20.6) in one go, (20.8): z_t = √ᾱ_t x + √(1-ᾱ_t) ε."""
        a = _expand(self.alphas_cumprod, t, x)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def posterior(self, x: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z_{t-1} | z_t, x), (20.13)–(20.15); for t = 0 the variance is 0."""
        a_t = _expand(self.alphas_cumprod, t, z_t)
        prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return posterior_between(x, z_t, a_t, _expand(prev, t, z_t))

    # ---- parameterisations (Dieleman's denoising-autoencoder view) ----------------------------
    def eps_to_x0(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂ = (z_t - √(1-ᾱ_t) ε̂) / √ᾱ_t, the inverse of (20.8), at timesteps t (see :meth:`abar_at`)."""
        return eps_to_x0_at(z_t, eps, self.abar_at(t, z_t))

    def x0_to_eps(self, z_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε̂ = (z_t - √ᾱ_t x̂) / √(1-ᾱ_t), the inverse of (20.8)."""
        a = self.abar_at(t, z_t)
        return (z_t - a.sqrt() * x0) / (1 - a).sqrt()

    def v_target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x."""
        a = self.abar_at(t, x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def v_to_eps(self, z_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √(1-ᾱ_t) z_t + √ᾱ_t v (from v and (20.8), using ᾱ + (1-ᾱ) = 1)."""
        a = self.abar_at(t, z_t)
        return (1 - a).sqrt() * z_t + a.sqrt() * v

    def v_to_x0(self, z_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x = √ᾱ_t z_t - √(1-ᾱ_t) v."""
        a = self.abar_at(t, z_t)
        return a.sqrt() * z_t - (1 - a).sqrt() * v

    def to_eps(self, prediction: Tensor, z_t: Tensor, t: Tensor, kind: str) -> Tensor:
        """Convert a network output of parameterisation ``kind`` ('eps', 'x0', 'v') to ε̂."""
        if kind == "eps":
            return prediction
        if kind == "x0":
            return self.x0_to_eps(z_t, t, prediction)
        if kind == "v":
            return self.v_to_eps(z_t, t, prediction)
        raise UserError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}")

    def target(self, x0: Tensor, t: Tensor, eps: Tensor, kind: str) -> Tensor:
        """The regression target of parameterisation ``kind`` for a training pair (x0, ε)."""
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":
            return self.v_target(x0, t, eps)
        raise UserError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}")


def posterior_between(x: Tensor, z_t: Tensor, abar_t: Tensor | float,
                      abar_s: Tensor | float) -> tuple[Tensor, Tensor]:
    """q(z_s | z_t, x) for any earlier s on the chain, (20.13)–(20.15) with β := 1 - ᾱ_t/ᾱ_s.

    With s = t-1 this is exactly the book's posterior; with a strided (respaced) chain it is the
    posterior of the shorter Markov chain that has the same marginals (20.6).
    """
    a_t, a_s = _as_batch(abar_t, z_t), _as_batch(abar_s, z_t)
    beta = 1 - a_t / a_s
    # (20.14) m_t = [√ᾱ_{t-1} β_t / (1-ᾱ_t)] x + [√(1-β_t) (1-ᾱ_{t-1}) / (1-ᾱ_t)] z_t
    mean = (a_s.sqrt() * beta / (1 - a_t)) * x + ((1 - beta).sqrt() * (1 - a_s) / (1 - a_t)) * z_t
    # (20.15) σ_t² = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
    var = beta * (1 - a_s) / (1 - a_t)
    return mean, var.expand_as(mean) if var.ndim else torch.full_like(mean, float(var))


def abar_from_sigma(sigma: float) -> float:
    """ᾱ = 1/(1+σ²), the inverse of σ = √((1-ᾱ)/ᾱ) (:attr:`Schedule.sigmas`); σ = 0 is clean data (ᾱ = 1)."""
    return 1 / (1 + sigma**2)


def eps_to_x0_at(z_t: Tensor, eps: Tensor, abar: Tensor | float) -> Tensor:
    """x̂ = (z_t - √(1-ᾱ) ε̂) / √ᾱ, the inverse of (20.8), for any ᾱ (a timestep's, or one of the σ view)."""
    if isinstance(abar, (float, int)):  # the samplers' σ view: a Python number, no host-to-device copy (a sync)
        return (z_t - (1 - abar) ** 0.5 * eps) / abar**0.5
    a = _as_batch(abar, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()
