"""Moving bytes between files and tensor memory, shared by the reader and the writer.

``preadv``/``writev`` straight from and into tensor memory (as memoryviews), retried
until every byte moved; errors name the file.
"""

from __future__ import annotations

import os

import torch

from vllm.model_executor.model_loader.safetensors.format import ShardFileError

IOV_MAX = 1024  # buffers per writev/preadv call (Linux's limit)


def advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``views`` left after ``n`` bytes were transferred."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views


def writev_fully(fd: int, views: list[memoryview]) -> None:
    while views:
        views = advance(views, os.writev(fd, views))


def preadv_fully(fd: int, views: list[memoryview], offset: int, path: str) -> int:
    """Fill ``views`` with the file's bytes from ``offset`` on, retrying short reads;
    returns the bytes read. A file that ends first raises ShardFileError naming ``path``."""
    views = [v for v in views if len(v)]
    total = sum(len(v) for v in views)
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n <= 0:
            raise ShardFileError(
                f"{path} ended early at byte {offset + done} (truncated while being read?)."
            )
        done += n
        views = advance(views, n)
    return total


def open_for_read(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ShardFileError(f"Cannot read shard file {path}: {e}") from e


def storage_bytes(t: torch.Tensor, start: int, end: int) -> memoryview:
    """Bytes [start, end) (addresses) of ``t``'s storage, as a memoryview that keeps the
    storage alive."""
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8).set_(
        storage, start - storage.data_ptr(), (end - start,)
    )
    return memoryview(flat.numpy())
