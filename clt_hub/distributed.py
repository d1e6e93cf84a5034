"""torch.distributed for every stage: joining a torchrun group and the few collectives clt_hub uses.

Every helper is a no-op on one process, so training and attribution each have a single code path for any
world size; both import them from here (the layer below them)."""

from __future__ import annotations

import os
import sys

import torch


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def say(message: str) -> None:
    """A message for the user on stderr, from rank 0 only (every rank runs the same code)."""
    if rank_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


def init_distributed() -> None:
    """Join the torchrun group (gloo on CPU, nccl on GPU) when launched by torchrun."""
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce(t: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of `t` over ranks, in place."""
    import torch.distributed as dist

    _, world = rank_world()
    if world > 1:
        dist.all_reduce(t)
        if average:
            t /= world
    return t


def agree_min(values: list[int]) -> list[int]:
    """The smallest of each value over ranks (every rank gets the same list)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long)
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [int(v) for v in t.tolist()]


def gather_features(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's feature slice (dim 0)."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()
