"""distributed: what fine-tuning needs to train across processes (DDP).

torch only, like the rest of the model core. A launcher (`torchrun`,
`accelerate launch`, `tuneloop finetune --nproc N`) starts one process per
rank with WORLD_SIZE, RANK and LOCAL_RANK set; `init_from_env` joins them into
a process group (NCCL on CUDA, gloo on CPU). Without those variables every
function here is the one-process identity, so `finetune` runs unchanged.

The data order is the one-process order: every rank builds the same global
batches and takes its own contiguous slice of each (`shard`), so the
optimizer sees the same global batch, and the loss is scaled so that DDP's
gradient average equals the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, weights and results."""
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str] | None = None) -> Ranks:
    """The launcher's WORLD_SIZE / RANK / LOCAL_RANK (rank 0 of 1 without them)."""
    values = os.environ if env is None else env
    return Ranks(int(values.get("RANK", 0)), int(values.get("WORLD_SIZE", 1)), int(values.get("LOCAL_RANK", 0)))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process on a node (cuda:LOCAL_RANK); CPU stays CPU."""
    if device.type == "cuda" and ranks.distributed and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def init_from_env(device: torch.device, timeout_minutes: float = 30.0) -> Ranks:
    """Joins the launcher's process group (no-op for one process or when already joined).

    Returns:
        This process's ranks.
    """
    ranks = ranks_from_env()
    if ranks.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(rank_device(device, ranks))
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=timeout_minutes))
    return current_ranks()


def current_ranks() -> Ranks:
    """This process's place in the joined process group (rank 0 of 1 when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shard(batch: np.ndarray, ranks: Ranks) -> tuple[np.ndarray, float]:
    """This rank's contiguous slice of a global batch and the weight of its loss.

    Slices differ in size by one at most (batch_size / world_size each). A rank
    whose slice is empty (a last batch smaller than the world) still runs one
    row, weighted 0, so every rank joins the gradient all-reduce.

    Returns:
        (row indices, loss weight): the weight turns the slice's summed loss
        into its share of the global batch's mean, times world_size (DDP then
        divides the summed gradients by world_size).
    """
    part = np.array_split(batch, ranks.world_size)[ranks.rank]
    if len(part) == 0:
        return batch[:1], 0.0
    return part, ranks.world_size / len(batch)


def broadcast_float(value: float, ranks: Ranks, device: torch.device) -> float:
    """Rank 0's value on every rank: decisions (validation score, early
    stopping) are taken once and shared, never recomputed per rank."""
    if not ranks.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def mean_across(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of a per-rank tensor over all ranks (itself for one process)."""
    if not ranks.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / ranks.world_size


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel when distributed, else itself.

    DDP broadcasts rank 0's weights at wrap time, so every rank starts equal,
    and averages gradients in backward; parameters stay those of `model`.
    """
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
