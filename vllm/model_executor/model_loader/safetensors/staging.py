"""Reads bound for a CUDA device: through pinned host buffers and per-thread streams.

A file cannot be read straight into device memory, so such a read goes into one of two
pinned buffers of the reading thread and is copied to the device asynchronously on the
thread's own stream, while the thread reads into the other buffer. A box that is not
one run of the file (a column slice) arrives as whole rows and is cut out on the device,
or, for a large tensor, is copied into the buffer out of a mapping of its rows.
``FileReader`` plans such reads (``StagedRead``) and ``run_staged`` runs them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from zlib_ng import zlib_ng

from vllm.model_executor.model_loader.safetensors.fileio import preadv_fully
from vllm.model_executor.model_loader.safetensors.format import Arrange, Box, copy_out
from vllm.model_executor.model_loader.safetensors.mapping import copy_mapped

# Reads bound for a CUDA tensor go through pinned host buffers of this size (CudaStaging).
STAGE_BYTES = 16 << 20
# Tests set this to send reads into CPU tensors the way of CUDA ones (``FileReader``'s
# ``stage_run``, ``stage_box``), so that path is checked without a GPU.
STAGE_CPU_READS = False

CrcRecord = tuple[int, int, int]  # (file offset, length, CRC-32 of those bytes)


def staged(dst: torch.Tensor) -> bool:
    """Whether a read into ``dst`` goes through staging buffers."""
    return not dst.is_cpu or STAGE_CPU_READS


class StagedRead(NamedTuple):
    """A read bound for a device, through a staging buffer."""

    offset: int  # file bytes [offset, offset + size)
    size: int
    dst: torch.Tensor
    # None: the bytes as they are into dst (a uint8 view); else how to view them and
    # which box of them goes to dst: taken on the device, or on the host (``on_host``,
    # out of a mapping of the bytes, into the staging buffer; the bytes are not read).
    arrange: Arrange | None = None
    on_host: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes it reads (a mapped read: the box's)."""
        return self.dst.nbytes if self.on_host else self.size


def box_reads(
    offset: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    box: Box,
    dst: torch.Tensor,
    on_host: bool,
) -> Iterator[StagedRead]:
    """Staged reads that put ``box`` of the tensor stored at ``offset`` into ``dst``, each
    for as many indices of the first dim as fit a staging buffer: their whole rows (the
    box is taken on the device), or with ``on_host`` the box of those rows (taken on the
    host out of a mapping). Where one index does not fit, each index's own box."""
    row = dtype.itemsize * math.prod(shape[1:])  # file bytes per index of the first dim
    staged = dst.element_size() * math.prod(dst.shape[1:]) if on_host else row
    a, b = box[0]
    if staged > STAGE_BYTES:
        for i in range(a, b):
            sub = dst[i - a]
            yield from box_reads(offset + i * row, dtype, shape[1:], box[1:], sub, on_host)
        return
    step = STAGE_BYTES // max(staged, 1)
    for r in range(a, b, step):
        n = min(step, b - r)
        arrange = (dtype, (n, *shape[1:]), ((0, n), *box[1:]))
        yield StagedRead(offset + r * row, n * row, dst[r - a : r - a + n], arrange, on_host)


def run_staged(
    fd: int, path: str, reads: list[StagedRead], buffers: CudaStaging, checksum: bool
) -> list[CrcRecord]:
    """Run ``reads`` on this thread with its ``buffers``: one preadv into a staging buffer
    per read, or per run of reads that follow each other in the file and fit one buffer
    together, or a copy out of a mapping; then the copies to the device. With
    ``checksum``, returns the CRC-32 of each run of file bytes read."""
    crcs: list[CrcRecord] = []
    i = 0
    while i < len(reads):
        read = reads[i]
        group = [read]
        nbytes = read.size
        i += 1
        while read.arrange is None and i < len(reads):
            nxt = reads[i]
            follows = nxt.arrange is None and nxt.offset == read.offset + nbytes
            fits = nbytes + nxt.size <= STAGE_BYTES and nxt.dst.device == read.dst.device
            if not (follows and fits):
                break
            group.append(nxt)
            nbytes += nxt.size
            i += 1
        if read.on_host:
            buf = buffers.buffer(read.dst.device)[: read.dst.nbytes]
            host = buf.view(read.dst.dtype).view(read.dst.shape)
            copy_mapped(fd, read.offset, read.offset + read.size, read.arrange, host)
            buffers.copy([(read.dst, host)])
            continue
        buf = buffers.buffer(read.dst.device)[:nbytes]
        view = memoryview(buf.numpy())
        preadv_fully(fd, [view], read.offset, path)
        if checksum:
            crcs.append((read.offset, nbytes, zlib_ng.crc32(view)))
        if read.arrange is not None:
            buffers.copy_rearranged(buf, read.arrange, read.dst)
            continue
        pairs, pos = [], 0
        for r in group:
            pairs.append((r.dst, buf[pos : pos + r.size]))
            pos += r.size
        buffers.copy(pairs)
    return crcs


class CudaStaging(threading.local):
    """Each thread's way from a file to a CUDA device: two pinned host buffers of
    ``STAGE_BYTES`` used in turn and a stream of its own, so a thread reads into one
    buffer while the copy out of the other runs (``copy(..., non_blocking=True)`` from
    pinned memory does not wait for the device). Whoever copies on these streams
    synchronizes the device before the destinations are used.

    For a CPU device (tests of the read plans without a GPU) the buffers are plain
    memory and the copies synchronous."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.buffers: list[torch.Tensor] = []
        self.events: list = []
        self.stream = None
        self.turn = 0
        self.scratch: torch.Tensor | None = None  # device bytes, for copies that rearrange

    def buffer(self, device: torch.device) -> torch.Tensor:
        """This thread's next buffer for ``device``, once its last copy has finished."""
        if device != self.device:
            if self.stream is not None:
                self.stream.synchronize()  # the old buffers' copies, before they go
            cuda = device.type == "cuda"
            self.buffers = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=cuda)
                            for _ in range(2)]  # fmt: skip
            self.events = [torch.cuda.Event() for _ in range(2)] if cuda else []
            self.stream = torch.cuda.Stream(device) if cuda else None
            if cuda:
                # Streams are unordered: the copies start after what the default stream
                # has queued (e.g. the model's construction initialising a parameter).
                self.stream.wait_stream(torch.cuda.default_stream(device))
            self.device, self.turn, self.scratch = device, 0, None
        if self.events:
            self.events[self.turn].synchronize()
        return self.buffers[self.turn]

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst.copy_(src)`` for each pair on this thread's stream, every ``src`` in the
        buffer ``buffer()`` last returned; it is handed out again once they are done."""
        with torch.cuda.stream(self.stream):  # None: the CPU, nothing to switch
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            if self.events:
                self.events[self.turn].record(self.stream)
        self.turn ^= 1

    def copy_rearranged(self, src: torch.Tensor, arrange: Arrange, dst: torch.Tensor) -> None:
        """``dst.copy_(box of the tensor whose bytes src holds)``, ``src`` in the buffer
        ``buffer()`` last returned: the bytes go to the device as they are, into a device
        buffer of this thread, and the box is copied out of that on the device."""
        if self.stream is None:
            copy_out(src, *arrange, dst)
            self.turn ^= 1
            return
        if self.scratch is None:
            with torch.cuda.stream(self.stream):  # its memory belongs to this stream
                self.scratch = torch.empty(STAGE_BYTES, dtype=torch.uint8, device=self.device)
        on_device = self.scratch[: len(src)]
        self.copy([(on_device, src)])
        with torch.cuda.stream(self.stream):  # after that copy; the next one waits for it
            copy_out(on_device, *arrange, dst)


# The pool threads' staging (a thread's buffers go with the thread).
pool_staging = CudaStaging()
