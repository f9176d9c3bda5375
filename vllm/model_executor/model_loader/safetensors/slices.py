"""Lazy slices of a safetensors file, as ``safe_open(...).get_slice(name)`` gives them.

A weight loader narrows a slice to its rank's part, then reads it straight into the
parameter: only that part's bytes are read, with no lasting memory map and no second
copy (``FileReader``). Tensors read on demand make the Hugging Face checkpoint
readable at any tensor-parallel size.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor

import torch

from vllm.model_executor.model_loader.safetensors import staging
from vllm.model_executor.model_loader.safetensors.format import (
    Box,
    ShardFileError,
    TensorEntry,
    read_header,
)
from vllm.model_executor.model_loader.safetensors.reader import FileReader, ReadStats
from vllm.model_executor.utils import narrow_by_ranges


class SafetensorsFile(FileReader):
    """A safetensors file whose tensors are read on demand, only the part asked for.

    Like ``safetensors.safe_open(...).get_slice(name)``, without a lasting memory map:
    the bytes go straight from the file into the destination tensor
    (``TensorSlice.read_into``; a strided slice through a mapping of its tensor that is
    closed after the copy, or for a small tensor through a scratch buffer), so loading
    holds no file pages in the process's memory and no second copy. With a ``pool``,
    ``read_into`` queues its reads and returns; ``wait()`` (or ``close()``) returns when
    they are done and raises the first read error.
    """

    def __init__(self, path: str, stats: ReadStats | None = None, pool: Executor | None = None):
        self.header = read_header(path)
        super().__init__(path, stats, pool)
        self._entries = {e.name: e for e in self.header.tensors}

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_slice(self, name: str) -> TensorSlice:
        entry = self._entries[name]
        whole = tuple((0, d) for d in entry.shape)
        return TensorSlice(self, entry, whole, whole)

    def __enter__(self) -> SafetensorsFile:
        return self


class TensorSlice:
    """A box of a tensor in a ``SafetensorsFile``: ``narrow`` it, then ``read_into`` a
    tensor (or index it, ``[:]``, for a new tensor). A box that is one run of the file is
    one read of exactly its bytes; any other (e.g. a column range of every row) is one
    strided copy out of a short-lived mapping of the tensor's pages, or, for a small
    tensor, out of the whole tensor read into a scratch buffer.

    A load makes a few of these per tensor, so their methods keep to plain Python."""

    def __init__(self, file: SafetensorsFile, entry: TensorEntry, box: Box, whole: Box):
        self.file = file
        self.entry = entry
        self.box = box  # (start, end) per dim
        self.whole = whole  # the box of the whole tensor
        self.dtype = entry.dtype
        self.shape = tuple(b - a for a, b in box)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> TensorSlice:
        a, b = self.box[dim]
        if start < 0 or length < 0 or a + start + length > b:
            raise IndexError(
                f"narrow({dim}, {start}, {length}) is out of range for {self.entry.name} "
                f"with shape {self.get_shape()}."
            )
        box = list(self.box)
        box[dim] = (a + start, a + start + length)
        return TensorSlice(self.file, self.entry, tuple(box), self.whole)

    def __getitem__(self, index) -> torch.Tensor:
        view = narrow_by_ranges(self, index)
        out = torch.empty(view.shape, dtype=self.dtype)
        view.read_into(out, wait=True)
        return out

    def reads_into(self, dst: torch.Tensor) -> bool:
        """Whether ``read_into`` takes ``dst`` (of any shape): a contiguous tensor on the
        CPU of the slice's dtype, or on a CUDA device of any dtype."""
        staged = dst.is_cuda or (dst.is_cpu and staging.STAGE_CPU_READS)
        return dst.is_contiguous() and (staged or (dst.is_cpu and dst.dtype == self.dtype))

    def copies_into(self, dst: torch.Tensor) -> bool:
        """Whether ``copy_into`` takes ``dst``: a CPU tensor of the slice's dtype and
        shape, strided or not (e.g. a column range of a parameter)."""
        return (
            dst.is_cpu
            and not staging.STAGE_CPU_READS
            and dst.dtype == self.dtype
            and tuple(dst.shape) == self.shape
        )

    def copy_into(self, dst: torch.Tensor) -> None:
        """Copy the box into ``dst`` (see ``copies_into``) with one strided copy out of a
        short-lived mapping of the tensor's pages, queued for the file's pool like
        ``read_into``: no buffer the size of the box."""
        if not self.copies_into(dst):
            raise ValueError(
                f"copy_into needs a CPU tensor of {self.dtype} and shape {self.get_shape()}; "
                f"got {dst.dtype} {list(dst.shape)} on {dst.device}."
            )
        self.file.copy_box(self.entry, self.box, dst, wait=False)

    def read_into(self, dst: torch.Tensor, wait: bool = False) -> None:
        """Read the box into ``dst``: a contiguous tensor of its shape, on the CPU of its
        dtype, or on a CUDA device of any dtype (through pinned buffers, ``CudaStaging``;
        another dtype is cast on the device). If the file has a pool, the bytes are in
        place after its ``wait()``, else (or with ``wait``) on return."""
        if not self.reads_into(dst):
            raise ValueError(
                "read_into needs a contiguous tensor: on the CPU of the slice's dtype "
                f"({self.dtype}), or on a CUDA device; got {dst.dtype} on {dst.device}."
            )
        if dst.shape != self.shape:
            raise ValueError(f"read_into: {list(dst.shape)} != slice {self.get_shape()}.")
        staged = not dst.is_cpu or staging.STAGE_CPU_READS
        file, entry, box = self.file, self.entry, self.box
        if file.fd < 0:
            raise ShardFileError(f"{file.path} was closed before {entry.name} was read.")
        # The box is one contiguous run of the file when only the first dim is narrowed
        # (rows), or more generally when every dim before the last narrowed one has
        # length 1: one read straight into dst. Else it is many runs (e.g. a column range
        # of every row of a row-parallel weight), where a read per run would cost a
        # syscall and Python work per row: one strided copy instead.
        strided = False
        if box[1:] != self.whole[1:]:
            cut = max(i for i in range(len(box)) if box[i] != self.whole[i])
            strided = dst.numel() > 0 and any(b - a > 1 for a, b in box[:cut])
        if staged and (strided or dst.dtype != self.dtype):  # cast on the device
            file.stage_box(entry, box, dst, strided, wait=wait)
            return
        if strided:
            file.copy_box(entry, box, dst, wait=wait)
            return
        offset = entry.start
        for i, (a, _) in enumerate(box):  # the box's first element, row-major
            if a:
                offset += a * self.dtype.itemsize * math.prod(entry.shape[i + 1 :])
        if staged:
            file.stage_run(offset, dst.view(-1).view(torch.uint8), wait=wait)
        else:
            file.read_run(offset, file.byte_view(dst), wait=wait)
