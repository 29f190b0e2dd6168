"""The training objective: a weighted MSE of a denoising autoencoder (DESIGN.md, Dieleman's view)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from latentdiff.diffusion.schedule import Schedule
from latentdiff.errors import UserError

WEIGHTINGS = ("uniform", "min_snr")


def loss_weight(schedule: Schedule, t: Tensor, prediction: str, weighting: str = "uniform",
                gamma: float = 5.0, offset: float = 0.0) -> Tensor:
    """λ(t) that multiplies the MSE of a ``prediction``-type target; float32, shape (B,).

    'uniform' is DDPM's "simple" loss (λ = 1 on whatever is predicted). 'min_snr' is Min-SNR-γ
    (Hang et al. 2023): the x-loss weighted by w = min(SNR + offset, γ), expressed for each target, since
    ‖ε - ε̂‖² = SNR ‖x - x̂‖² and ‖v - v̂‖² = (1 + SNR) ‖x - x̂‖². offset 0 is the paper's (the ε-loss capped
    at low noise; it gives the noisiest steps, where the layout is decided, a weight near 0); offset 1 caps
    the v-loss (Salimans & Ho's "SNR+1" weighting) instead, so those steps keep the weight 1 of plain v.
    """
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise UserError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    snr = schedule.snr(t)
    w = (snr + offset).clamp(max=gamma)
    per_target = {"eps": w / snr, "x0": w, "v": w / (snr + 1)}
    if prediction not in per_target:
        raise UserError(f"unknown prediction type {prediction!r}")
    return per_target[prediction].float()


def draw_t_eps(schedule: Schedule, shape: tuple[int, ...], generator: Optional[torch.Generator] = None,
               eps_generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """t ~ U{0..T-1} per sample and ε ~ N(0, I) of ``shape``, on the CPU ``generator`` (any device, same draw);
    ε on ``eps_generator``'s device when one is given (a trainer on a GPU draws it there)."""
    t = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=generator)
    g = eps_generator or generator
    return t, torch.randn(shape, generator=g, device=g.device if g is not None else None)


def diffusion_loss(model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: Schedule,
                   prediction: str = "eps", weighting: str = "uniform", gamma: float = 5.0, offset: float = 0.0,
                   generator: Optional[torch.Generator] = None, t: Optional[Tensor] = None,
                   eps: Optional[Tensor] = None) -> Tensor:
    """E_{t,x,ε}[λ(t) ‖target - model(z_t, t)‖²] for one batch; t ~ U{0..T-1}, ε ~ N(0, I).

    t and ε are drawn on the CPU ``generator`` (:func:`draw_t_eps`) unless given (a data-parallel
    trainer draws them for the global batch and passes each process its rows).
    """
    if t is None or eps is None:
        t, eps = draw_t_eps(schedule, tuple(x0.shape), generator)
    eps = eps.to(x0.device, x0.dtype)
    z_t = schedule.q_sample(x0, t, eps)  # (20.8)
    pred = model_fn(z_t, t.to(x0.device))
    target = schedule.target(x0, t, eps, prediction)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (loss_weight(schedule, t, prediction, weighting, gamma, offset).to(mse.device) * mse).mean()
