"""Tensor-parallel state of this process, set once per worker.

At world size 1 nothing is initialised and the collectives are identities, so the
parallel layers run unchanged in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0
    world_size: int = 1


_INFO = DistributedInfo()


def init_distributed_environment(
    world_size: int,
    rank: int,
    init_method: str | None = None,
    backend: str = "gloo",
    timeout_s: float | None = None,
) -> None:
    """Join the process group of the TP workers (a no-op at world size 1).

    ``timeout_s`` bounds the rendezvous and every later collective, so a rank whose
    peer is gone raises instead of waiting forever (default: VLLM_DIST_TIMEOUT_S or 600).
    """
    global _INFO
    if world_size > 1 and not dist.is_initialized():
        if timeout_s is None:
            timeout_s = float(os.environ.get("VLLM_DIST_TIMEOUT_S", "600"))
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world_size,
            rank=rank,
            timeout=timedelta(seconds=timeout_s),
        )
    _INFO = DistributedInfo(rank=rank, world_size=world_size)


def destroy_distributed_environment() -> None:
    global _INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistributedInfo()


@contextmanager
def tensor_parallel_state(rank: int, world_size: int) -> Iterator[None]:
    """Act as rank ``rank`` of ``world_size`` TP ranks without joining a process group.

    Building a rank's model and loading its weights do not communicate, so one process
    can build any rank's model (tests, checks of a layout); collectives still need a
    real group. The previous state comes back on exit.
    """
    global _INFO
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside tensor_parallel_size={world_size}.")
    previous = _INFO
    _INFO = DistributedInfo(rank=rank, world_size=world_size)
    try:
        yield
    finally:
        _INFO = previous


def get_tensor_model_parallel_rank() -> int:
    return _INFO.rank


def get_tensor_model_parallel_world_size() -> int:
    return _INFO.world_size


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def tensor_model_parallel_all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``x`` over the ranks in place (``op``: "sum" or "max"); returns it."""
    if _INFO.world_size == 1:
        return x
    dist.all_reduce(x, op=_REDUCE_OPS[op])
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (all ranks get the result)."""
    if _INFO.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_INFO.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
