"""Module-level functions the tests run on every rank with ``collective_rpc(fn)``.

They live in an importable module because a spawned worker unpickles them by name.
"""

from __future__ import annotations

import os
import time

import torch


def rank_and_pid(worker) -> tuple[int, int]:
    return worker.rank, os.getpid()


def num_threads(worker) -> int:
    return torch.get_num_threads()


def load_memory(worker) -> tuple[int, int]:
    """(RSS before loading, peak RSS since the process started) in bytes."""
    return worker.load_memory


def param_bytes(worker) -> int:
    return sum(p.numel() * p.element_size() for p in worker.model.parameters())


def fail_on_rank(worker, rank: int) -> int:
    if worker.rank == rank:
        raise ValueError(f"deliberate failure on rank {worker.rank}")
    return worker.rank


def sleep(worker, seconds: float) -> int:
    time.sleep(seconds)
    return worker.rank


def fail_while_peers_wait(worker) -> None:
    """Rank 0 enters a collective that rank 1 never joins: rank 0 is stuck until killed."""
    import torch.distributed as dist

    if worker.rank == 1:
        raise RuntimeError("rank 1 fails before the barrier")
    dist.barrier()


def big_result(worker, n: int) -> bytes:
    return bytes(n)
