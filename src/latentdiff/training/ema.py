"""Exponential moving average of model weights, the copy used for sampling by default."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← θ_ema + (1 - d)(θ - θ_ema), with d warmed up as min(decay, (1 + n)/(10 + n)).

    The warm-up keeps early EMA weights from being dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = list(self.model.parameters())  # built once: update() runs every step

    def decay_at(self, step: int) -> float:
        """The decay used for the update after ``step`` optimiser steps."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, skip: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s current weights; not at all where ``skip`` (a 0-d bool tensor,
        e.g. a non-finite loss, decided on the device without the host reading it) is set."""
        cur_p = [p.detach() for p in model.parameters()]
        weight = 1.0 - self.decay_at(step)
        if skip is None:
            torch._foreach_lerp_(self._ema_params, cur_p, weight)
        else:
            w = torch.where(skip, 0.0, weight).to(self._ema_params[0].dtype)
            torch._foreach_lerp_(self._ema_params, cur_p, [w] * len(cur_p))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
