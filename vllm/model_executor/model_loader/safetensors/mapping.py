"""Tensors over a file's pages: private (copy-on-write) memory mappings.

Mapped tensors share the page cache's pages: no copy, no new memory, and a write to a
tensor copies just that page. A mapped file must not be truncated or rewritten in place
(reading a page past its end raises SIGBUS); ``save_sharded_state`` never does that, it
swaps in new files.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os

import torch

from vllm.model_executor.model_loader.safetensors.fileio import open_for_read
from vllm.model_executor.model_loader.safetensors.format import Arrange, FileHeader, copy_out

_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module
_MAP_FIXED = 0x10  # Linux; not in Python 3.11's mmap module


def map_private(fd: int, length: int, offset: int = 0) -> mmap.mmap:
    """A private, writable (copy-on-write) mapping of file bytes [offset, offset + length);
    ``offset`` is a multiple of the page size."""
    return mmap.mmap(fd, length, offset=offset, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip


def populate(mapped: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Read ahead the mapped pages if they are not cached, and fill the page tables now
    rather than page by page on first touch (an older kernel: on first touch)."""
    length = len(mapped) - start if length is None else length
    mapped.madvise(mmap.MADV_WILLNEED, start, length)
    try:
        mapped.madvise(_MADV_POPULATE_READ, start, length)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise


@functools.cache
def _libc_mmap():
    mmap_fn = ctypes.CDLL(None, use_errno=True).mmap
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                        ctypes.c_int, ctypes.c_long]  # fmt: skip
    return mmap_fn


def map_over(address: int, length: int, path: str, offset: int) -> None:
    """Map file bytes [offset, offset + length) privately at ``address``, in place of the
    memory mapped there (``MAP_FIXED``): every tensor viewing that memory then reads
    the file. ``offset`` and ``address`` are page-aligned."""
    fd = open_for_read(path)
    try:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | _MAP_FIXED
        got = _libc_mmap()(address, length, prot, flags, fd, offset)
        if got in (None, ctypes.c_void_p(-1).value) or got != address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path} over the weights failed: {os.strerror(err)}")
    finally:
        os.close(fd)  # the mapping keeps the file open


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class TypedViews:
    """Tensors at byte offsets of one uint8 buffer: one ``as_strided`` of the buffer
    viewed as each dtype, cheaper than slicing and viewing per tensor."""

    def __init__(self, data: torch.Tensor):
        self.data = data
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer as each dtype

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        """The tensor at byte ``offset`` (a multiple of the dtype's size)."""
        typed = self._typed.get(dtype)
        if typed is None:
            usable = len(self.data) - len(self.data) % dtype.itemsize
            typed = self._typed[dtype] = self.data[:usable].view(dtype)
        return typed.as_strided(shape, contiguous_strides(shape), offset // dtype.itemsize)


def map_file(header: FileHeader) -> dict[str, torch.Tensor]:
    """Map the file's tensors into memory (private, copy-on-write), page tables filled.
    The file's pages stay mapped until the last tensor is gone. Tensors whose offset is
    not a multiple of their element size are left out."""
    fd = open_for_read(header.path)
    try:
        mapped = map_private(fd, header.size)
    finally:
        os.close(fd)  # the mapping keeps the file open
    populate(mapped)
    views = TypedViews(torch.frombuffer(mapped, dtype=torch.uint8))
    return {
        e.name: views.view(e.dtype, e.shape, e.start)
        for e in header.tensors
        if e.start % e.dtype.itemsize == 0
    }


def copy_mapped(fd: int, start: int, end: int, arrange: Arrange, dst: torch.Tensor) -> None:
    """``copy_out`` of file bytes [start, end) through a private mapping of their
    pages, closed on return: only the pages the box touches are read."""
    first = start - start % mmap.PAGESIZE
    mapped = map_private(fd, end - first, first)
    try:
        copy_out(torch.frombuffer(mapped, dtype=torch.uint8)[start - first :], *arrange, dst)
    finally:
        mapped.close()  # the views of it are gone with copy_out's frame
