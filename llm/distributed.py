"""Data-parallel training with torch.distributed: which process am I, and the few collectives we need.

Launch with `torchrun --standalone --nproc_per_node=N -m flows.pretrain`; torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK. Without it, everything here is a no-op for a single process. CUDA uses NCCL, one GPU per
process; the CPU uses gloo (the tests run two CPU processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs, tracks and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Dist:
    """This process's place, from torchrun's environment (a single process without it)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(dist: Dist, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group; on CUDA each process takes the GPU of its local rank. Returns the device
    and whether this call started the group: the caller that started it ends it (`shutdown`)."""
    if not dist.enabled:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if torch_dist.is_initialized():
        return device, False
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The mean of `value` over all processes."""
    if dist.enabled:
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.AVG if value.is_cuda else torch_dist.ReduceOp.SUM)
        if not value.is_cuda:  # gloo has no AVG
            value /= dist.world_size
    return value


def broadcast(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The main process's `value`, on every process."""
    if dist.enabled:
        value = value.clone()
        torch_dist.broadcast(value, src=0)
    return value


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()
