"""Data whose exact denoiser is known in closed form, for checking samplers (tests and benchmarks).

A Gaussian, whose probability-flow ODE is solvable in closed form, and a Gaussian mixture, whose
posterior mean E[x | z_t] is a responsibility-weighted sum of Gaussian posterior means. Both give the
exact ε-predictor of the discrete schedule through (20.8): ε = (z_t - √ᾱ_t E[x | z_t]) / √(1-ᾱ_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentdiff.diffusion.schedule import Schedule
from latentdiff.diffusion.sigmas import EpsFn


def _f64(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _abar(schedule: Schedule, t: Tensor, like: Tensor, extra_dims: int) -> Tensor:
    """ᾱ at (B,) timesteps: the table at integers, the continuous time input's ᾱ between them (abar_at)."""
    assert t.shape == (like.shape[0],), "eps_fn takes a (B,) tensor of timesteps"
    return schedule.abar_at(t, like).reshape(-1, *[1] * extra_dims)


@dataclass(frozen=True)
class Gaussian:
    """x ~ N(μ, diag s²)."""

    mu: Tensor
    sd: Tensor

    def eps_fn(self, schedule: Schedule) -> EpsFn:
        """E[ε | z_t] = √(1-ᾱ)(z - √ᾱ μ) / (ᾱ s² + 1 - ᾱ), since z_t ~ N(√ᾱ μ, ᾱ s² + 1 - ᾱ) (20.6)."""
        def eps(z: Tensor, t: Tensor) -> Tensor:
            a, mu, sd = _abar(schedule, t, z, 1), self.mu.to(z), self.sd.to(z)
            return (1 - a).sqrt() * (z - a.sqrt() * mu) / (a * sd**2 + 1 - a)
        return eps

    def flow(self, x: Tensor, s0: float, s: float) -> Tensor:
        """The exact probability-flow ODE map in the σ view from x at σ = s0 to σ = s: x - μ ∝ √(s² + σ²)."""
        return self.mu + (x - self.mu) * ((self.sd**2 + s**2) / (self.sd**2 + s0**2)).sqrt()

    def w2(self, x: Tensor) -> float:
        """2-Wasserstein distance between the Gaussian fitted to x (diagonal) and this one."""
        return float(((x.mean(0) - self.mu) ** 2 + (x.std(0) - self.sd) ** 2).sum().sqrt())


@dataclass(frozen=True)
class GaussianMixture:
    """x ~ Σ_k w_k N(m_k, diag s_k²), in 2-D for the sliced distance's directions."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, 2)
    sds: Tensor  # (K, 2)
    _quantiles: dict = field(default_factory=dict, compare=False, repr=False)

    def eps_fn(self, schedule: Schedule) -> EpsFn:
        """ε from E[x | z_t] = Σ_k r_k(z) E[x | z_t, k], the responsibilities r_k from z_t | k (20.6)."""
        def eps(z: Tensor, t: Tensor) -> Tensor:
            a = _abar(schedule, t, z, 2)  # (B, 1, 1)
            w, m, s = self.weights.to(z), self.means.to(z), self.sds.to(z)
            var, diff = a * s**2 + 1 - a, z[:, None] - a.sqrt() * m  # (B, K, d): z_t | k ~ N(√ᾱ m_k, var)
            r = (w.log() - 0.5 * (diff**2 / var + var.log()).sum(-1)).softmax(-1)[..., None]
            x0 = (r * (m + a.sqrt() * s**2 / var * diff)).sum(1)  # Gaussian posterior means, weighted
            return (z - a[:, 0].sqrt() * x0) / (1 - a[:, 0]).sqrt()
        return eps

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.sds[k] * noise

    def mode_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Weights and component means recovered by assigning each sample to the nearest mode."""
        k = torch.cdist(x, self.means).argmin(1)
        means = torch.stack([x[k == j].mean(0) for j in range(len(self.weights))])
        return torch.bincount(k, minlength=len(self.weights)).double() / len(x), means

    @staticmethod
    def directions(count: int = 12) -> Tensor:
        angles = torch.arange(count, dtype=torch.float64) * math.pi / count
        return torch.stack([angles.cos(), angles.sin()], 1)

    def quantiles(self, n: int) -> Tensor:
        """(n, 12) quantiles at levels (i + ½)/n of the mixture projected on 12 directions (bisection)."""
        if n not in self._quantiles:
            dirs, u = self.directions(), (torch.arange(n, dtype=torch.float64) + 0.5) / n
            m, s = (self.means @ dirs.T)[:, :, None], ((self.sds**2) @ (dirs**2).T).sqrt()[:, :, None]
            hi = torch.full((len(dirs), n), 1e3, dtype=torch.float64)
            lo = -hi
            for _ in range(80):
                mid = (lo + hi) / 2
                below = (self.weights[:, None, None] * 0.5 * (1 + torch.erf((mid - m) / (s * 2**0.5)))).sum(0) < u
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            self._quantiles[n] = ((lo + hi) / 2).T
        return self._quantiles[n]

    def sliced_w2(self, x: Tensor) -> float:
        """Sliced 2-Wasserstein distance of samples x to the exact mixture (12 directions, exact quantiles)."""
        proj = (x.double() @ self.directions().T).sort(0).values
        return float((proj - self.quantiles(len(x))).pow(2).mean().sqrt())


def qmc_normal(n: int, d: int, seed: int = 0) -> Tensor:
    """Standard normal noise from a scrambled Sobol sequence, moment-matched per dimension (float64).

    With it a deterministic sampler's error is its discretisation error, not Monte-Carlo error.
    """
    u = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    x = 2**0.5 * torch.erfinv(2 * u.clamp(1e-12, 1 - 1e-12) - 1)
    return (x - x.mean(0)) / x.std(0)


GAUSSIAN = Gaussian(_f64([1.0, -0.5, 0.0]), _f64([0.5, 0.2, 1.0]))
MIXTURE = GaussianMixture(_f64([0.3, 0.7]), _f64([[-2.0, 0.5], [1.5, -0.5]]), _f64([[0.3, 0.5], [0.5, 0.25]]))
