"""Data-parallel training under ``torchrun``: process group, ranks, sharding and the few collectives we need.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts one
process per device. Every process draws the *same* global batch (indices and random numbers) from the same
seeded generators and computes only its own slice of it, so N processes with B/N images each take exactly
the step that one process takes with B images, and resuming needs one copy of the generator states.
Gradients are averaged over processes (DistributedDataParallel for the networks, :func:`all_reduce_mean_`
for the few parameters outside them); only rank 0 writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latentdiff.errors import UserError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global rank, the number of processes, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1


def env_from_environ() -> DistEnv:
    """The ranks torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK); one process when they are absent."""
    values = {}
    for key in ENV_KEYS:
        raw = os.environ.get(key)
        if raw is None:
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise UserError(f"environment variable {key}={raw!r} is not an integer (set by torchrun)") from None
    env = DistEnv(values.get("RANK", 0), values.get("WORLD_SIZE", 1), values.get("LOCAL_RANK", values.get("RANK", 0)))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise UserError(f"inconsistent torchrun environment: RANK={env.rank} WORLD_SIZE={env.world_size} "
                        f"LOCAL_RANK={env.local_rank}")
    return env


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on CPU) when launched by torchrun; one device per local rank."""
    env = env_from_environ()
    if not env.active:
        return env, device
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--device {device} under torchrun would put all {env.world_size} processes on one GPU; "
                            "use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if env.local_rank >= torch.cuda.device_count():  # `--device auto|cuda`: the GPU of this local rank
            raise UserError(f"LOCAL_RANK {env.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                            "start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise UserError(f"WORLD_SIZE={env.world_size} but {key} is not set; launch with torchrun")
        dist.init_process_group(backend)
    elif dist.get_world_size() != env.world_size:
        raise UserError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE={env.world_size}")
    return env, device


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend() -> str:
    """The process group's backend (nccl, gloo), or 'none', for the log."""
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "none"


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if _active():
        dist.barrier()


@contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache, writes a tokenizer); the others run it afterwards."""
    if not env.is_main:
        barrier()
    yield
    if env.is_main:
        barrier()


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average tensors over processes, in place, in one collective (flattened into one buffer)."""
    if not _active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def mean_logs(logs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Each log value (a float, or a 0-d tensor that stays on the device) averaged over processes (a NaN
    anywhere makes it NaN everywhere)."""
    if not _active():
        return logs
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in logs.values()])
    dist.all_reduce(values)
    values = values / dist.get_world_size()
    return {k: (values[i] if isinstance(v, Tensor) else float(values[i])) for i, (k, v) in enumerate(logs.items())}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's (picklable, trusted: it comes from our own process group) object, on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every process (decisions such as 'time is up' must be taken together)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def gather_objects(obj: object) -> list[object]:
    """``obj`` of every process, in rank order (small picklable values such as RNG states)."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over processes (works on gloo, unlike reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n: (dist.get_rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every process's ``x`` (same shape) along dim 0, in rank order, keeping gradients.

    When every process computes the same loss L of the gathered tensor, each one's gradient for its own
    slice is Σ_ranks ∂L/∂x_r = world_size · ∂L/∂x_r, which DDP's averaging turns back into ∂L/∂θ.
    """
    return _GatherWithGrad.apply(x) if _active() else x


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` inside DistributedDataParallel (parameters broadcast from rank 0), or itself for one process."""
    if not _active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shard(n: int, accum: int, env: DistEnv) -> list[slice]:
    """This process's rows of a global batch of n rows, one slice per accumulation micro-step.

    Micro-step i covers rows [i·n/accum, (i+1)·n/accum) of the global batch, split evenly over the ranks
    in rank order; n must divide by accum × world_size (checked when the run starts).
    """
    micro = n // (accum * env.world_size)
    return [slice((i * env.world_size + env.rank) * micro, (i * env.world_size + env.rank + 1) * micro)
            for i in range(accum)]
