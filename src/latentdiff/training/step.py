"""What a training step does beside its loss, for every trainer: the optimiser, autocast, micro-steps over
processes and accumulation, and the skip of a non-finite step on the device (mixed into TrainingRun)."""

from __future__ import annotations

import functools
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from latentdiff.training import distributed

Batch = dict[str, torch.Tensor]  # a global batch: tensors whose first dimension runs over its images


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where oneDNN's bf16 convolutions and
    matrix products run ~2x fp32's; elsewhere bf16 is emulated and no faster, so auto keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, keep fp32
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def auto_precision(device: torch.device) -> str:
    """What train.precision=auto means on ``device``: bf16 on a GPU or CPU that computes it natively, else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


class StepHelpers:
    """Optimiser step, autocast and gradient accumulation for :class:`~latentdiff.training.loop.TrainingRun`."""

    def adamw(self, params: Any, **kw: Any) -> torch.optim.AdamW:
        """AdamW, fused into one kernel per step on CPU and CUDA: several times faster than torch's per-tensor
        loop on the many small tensors of a small model (benchmarks/results/train_step.md)."""
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(params, fused=fused, **kw)

    @property
    def precision(self) -> str:
        """train.precision, with auto resolved: bf16 autocast (fp32 master weights) on a GPU that has it and
        on a CPU with bf16 units, else fp32 (benchmarks/results/cpu_step_options.md: 1.09-1.42x per step)."""
        p = self.cfg.train.precision
        return auto_precision(self.device) if p == "auto" else p

    def autocast(self) -> ContextManager:
        """Autocast of the forward for train.precision (bf16 or fp16); nothing for fp32."""
        p = self.precision
        if p == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, torch.bfloat16 if p == "bf16" else torch.float16)

    def accumulate(self, batch: Batch, loss_fn: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]],
                   opt: torch.optim.Optimizer) -> dict[str, float]:
        """Zero ``opt``'s gradients, then forward and backward this rank's rows in train.grad_accum micro-steps.

        Each micro-step's loss (a mean over its rows) is divided by grad_accum and DDP averages over the
        ranks, so the gradients are those of the mean loss over the global batch. Returns the logs of
        ``loss_fn`` averaged over micro-steps and ranks.
        """
        opt.zero_grad(set_to_none=True)
        parts = [{k: v[s] for k, v in batch.items()} for s in
                 distributed.shard(len(batch["idx"]), self.cfg.train.grad_accum, self.dist)]
        sums: dict[str, float] = {}
        for i, part in enumerate(parts):
            with self._no_sync(i < len(parts) - 1):  # DDP averages once, after the last micro-step
                loss, logs = loss_fn(part)
                loss = loss / len(parts)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in logs.items():  # float64 like the host's floats: the same means as reading each step
                sums[k] = sums.get(k, 0.0) + (v.double() if isinstance(v, torch.Tensor) else v) / len(parts)
        return distributed.mean_logs(sums, self.device)

    def _no_sync(self, skip: bool) -> ContextManager:
        stack = ExitStack()
        if skip:
            for ddp in self._ddp:
                stack.enter_context(ddp.no_sync())
        return stack

    def check_finite(self, loss: float | torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor on the device: is this step's loss NaN/inf? Read only with the next log row.

        Hand it to :meth:`optimizer_step` (and the EMA) to skip the update on the device; the loop counts
        such steps and stops with an error naming them past train.max_bad_steps. Under torchrun pass the
        loss averaged over ranks (:meth:`accumulate`'s), so that all skip together.
        """
        loss = torch.as_tensor(loss, device=self.device)
        self.bad_flag = ~torch.isfinite(loss.detach())
        return self.bad_flag

    def optimizer_step(self, opt: torch.optim.Optimizer, params: Any, skip: torch.Tensor | None = None) -> None:
        """After :meth:`accumulate`: average the gradients DDP does not cover, clip (train.grad_clip), step.

        ``skip`` (a 0-d bool tensor) leaves the weights and the optimiser's state as they were, without the
        host reading it: the fused AdamW takes it as its ``found_inf`` (as GradScaler does); a non-finite
        gradient norm skips too.
        """
        params = list(params)
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None and id(p) not in self._synced])
        if self.scaler:
            self.scaler.unscale_(opt)
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            if skip is not None:
                skip = skip | ~torch.isfinite(norm)
                self.bad_flag = skip
        if self.scaler:
            self.scaler.step(opt)  # skipped when fp16 gradients overflowed; update() then lowers the scale
        elif skip is not None and getattr(opt, "_step_supports_amp_scaling", False):
            opt.found_inf = skip.float()
            opt.step()
        elif skip is not None and bool(skip):  # an optimiser that cannot skip on the device: ask the host
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
