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


def gather_strided(local: torch.Tensor, n: int) -> torch.Tensor:
    """Items 0..n-1 dealt round-robin over the ranks (rank r computed items r, r + world, ...: `local` holds
    them in that order) -> all n items in order, on every rank. Shares are padded to one size for all_gather."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return local
    width = -(-n // world)
    padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(n, *local.shape[1:], dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))]
    return out
