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

from typing import Callable, Mapping

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
