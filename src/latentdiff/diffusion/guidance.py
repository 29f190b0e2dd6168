"""Classifier-free guidance: a denoiser wrapped into another denoiser (samplers never see it).

The conditional network ε̂(z, t, c) was trained with c replaced by a null condition ∅ some of the
time, so the same weights also give ε̂(z, t, ∅). Guidance extrapolates from the unconditional
prediction towards the conditional one:

    ε̃ = ε̂(z, t, ∅) + w · (ε̂(z, t, c) − ε̂(z, t, ∅))

w = 1 is the plain conditional model, w = 0 the unconditional one. Because ε, x0 and v are affine in
one another at a fixed (z, t) (DESIGN.md, denoising-autoencoder view), combining the raw predictions
of any parameterisation is the same as combining ε. A negative prompt is simply used as ∅.

Guidance in a limited interval (Kynkäänniemi et al. 2024): at the noisiest steps guidance pulls every
sample towards the same layout, so `max_t` leaves the steps with t > max_t unguided (w = 1, one
pass instead of two): samples keep the data's spread of places and sizes, and the later steps still
sharpen what the prompt says.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from latentdiff.errors import UserError

CondFn = Callable[..., Tensor]  # model(x, t, **cond) -> prediction


def classifier_free_guidance(model: CondFn, cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor],
                             scale: float, max_t: float | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The guided denoiser (x, t) -> prediction; conditional and unconditional run as one batch.

    With ``max_t``, only steps with t <= max_t are guided; the others get the conditional prediction.
    """
    if not scale >= 0:
        raise UserError(f"guidance scale must be >= 0, got {scale}")
    if max_t is not None and not max_t >= 0:
        raise UserError(f"guidance max_t must be >= 0, got {max_t}")
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond name different inputs: {sorted(cond)} vs {sorted(uncond)}")
    if scale == 1.0:
        return lambda x, t: model(x, t, **cond)
    if scale == 0.0:
        return lambda x, t: model(x, t, **uncond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if max_t is not None and bool((t > max_t).all()):  # a sampler's step: one t for the batch
            return model(x, t, **cond)
        pred_u, pred_c = model(torch.cat([x, x]), t.repeat(2), **both).chunk(2)
        out = pred_u + scale * (pred_c - pred_u)
        if max_t is not None:  # mixed timesteps: the unguided ones keep the conditional prediction
            out = torch.where((t > max_t).reshape(-1, *[1] * (x.ndim - 1)), pred_c, out)
        return out

    return guided


def regional_guidance(model: CondFn, regions: Sequence[tuple[Mapping[str, Tensor], Tensor]],
                      uncond: Mapping[str, Tensor], scale: float,
                      max_t: float | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Guidance by several conditions, each only inside its region (regional prompting, MultiDiffusion-style):

        ε̃ = ε̂(z, t, ∅) + w · Σ_i m_i ⊙ (ε̂(z, t, c_i) − ε̂(z, t, ∅))

    ``regions``: (condition, mask (B, 1, h, w) on z's grid) pairs whose masks sum to 1 at every point, so
    with one region of mask 1 this is :func:`classifier_free_guidance`. The unconditional and every
    regional pass run as one batch; steps with t > ``max_t`` get w = 1 (no extrapolation).
    """
    if not scale >= 0:
        raise UserError(f"guidance scale must be >= 0, got {scale}")
    if not regions:
        raise ValueError("regional_guidance needs at least one region")
    if any(set(c) != set(uncond) for c, _ in regions):
        raise ValueError(f"every region's condition must name the inputs of uncond: {sorted(uncond)}")
    k = len(regions) + 1
    both = {name: torch.cat([uncond[name], *(c[name] for c, _ in regions)]) for name in uncond}
    masks = torch.stack([m for _, m in regions])  # K × B × 1 × h × w

    def guided(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        preds = model(x.repeat(k, *[1] * (x.ndim - 1)), t.repeat(k), **both).unflatten(0, (k, x.shape[0]))
        delta = (masks.to(preds) * (preds[1:] - preds[0])).sum(0)
        w = torch.where(t > max_t, 1.0, scale) if max_t is not None else torch.full_like(t, scale, dtype=x.dtype)
        return preds[0] + w.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) * delta

    return guided
