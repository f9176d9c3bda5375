"""The one read engine: pieces of a file read straight into their destinations, on a pool.

A ``FileReader`` takes pieces of one file: a run of bytes (offset, length) into CPU
memory, or through the file's CRC-32 only; a box of a stored tensor copied into a tensor
(a strided slice, e.g. a row-parallel rank's columns); or a read bound for a CUDA tensor
through pinned buffers (``staging``). With a pool it gathers pieces into tasks of about
``_TASK_BYTES`` (big runs cut, small ones joined, since a task per small tensor costs
more than its bytes; runs that follow each other in the file read with one ``preadv``),
and ``wait()`` returns once they are in place, raising the first read error. ``preadv``
and zlib-ng's ``crc32`` release the GIL, so the threads read, fault in destination
pages and checksum in parallel.

Its clients: the lazy slices of Hugging Face files (``slices.SafetensorsFile``) and
``read_tensors``, which reads whole files into a model's tensors (the sharded-state
loader), verifying CRC-32s on request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import torch
from zlib_ng import zlib_ng

from vllm.model_executor.model_loader.safetensors import staging
from vllm.model_executor.model_loader.safetensors.fileio import (
    IOV_MAX,
    open_for_read,
    preadv_fully,
    storage_bytes,
)
from vllm.model_executor.model_loader.safetensors.format import (
    Box,
    FileHeader,
    ShardFileError,
    TensorEntry,
    copy_out,
)
from vllm.model_executor.model_loader.safetensors.mapping import copy_mapped
from vllm.model_executor.model_loader.safetensors.staging import (
    CrcRecord,
    CudaStaging,
    StagedRead,
    box_reads,
    run_staged,
)

_TASK_BYTES = 16 << 20
# A strided slice (a row-parallel rank's columns) of a tensor up to this size is copied
# out of the whole tensor read into a scratch buffer: setting up and tearing down a
# mapping costs more than reading the other ranks' columns too. Where rows are shorter
# than a page, the rank's columns touch every page of the tensor anyway.
_SMALL_TENSOR_BYTES = 1 << 20
_MAX_THREADS = 8
_scratch = threading.local()

Run = tuple[int, int, memoryview | None]  # (offset, length, destination; None: CRC only)


def default_num_threads() -> int:
    """Reader threads per process: ``VLLM_LOAD_THREADS``, else the usable cores (at most 8)."""
    value = os.environ.get("VLLM_LOAD_THREADS")
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"VLLM_LOAD_THREADS must be a positive integer, got {value!r}.")
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, _MAX_THREADS))


class ReadStats:
    """Bytes read by the ``FileReader`` objects that share it."""

    def __init__(self) -> None:
        self.bytes_read = 0


def _small(entry: TensorEntry) -> bool:
    """Whether a strided slice of ``entry`` is taken from the whole tensor read, not
    through a mapping of its pages (``_SMALL_TENSOR_BYTES``)."""
    return entry.end - entry.start <= _SMALL_TENSOR_BYTES


def _scratch_bytes(n: int) -> torch.Tensor:
    """``n`` bytes of this thread's scratch buffer (shared by all files; gone with the
    thread): bytes only the checksum reads, or a small tensor a box is copied out of."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < n:
        buffer = _scratch.buffer = torch.empty(max(n, _SMALL_TENSOR_BYTES), dtype=torch.uint8)
    return buffer[:n]


class FileReader:
    """Pieces of one file read into their destinations; see the module docstring.

    Without a pool a piece is read on the call; with one, the pieces are in place after
    ``wait()`` (or ``close()``). With ``checksum``, the CRC-32 of every byte read is
    kept (``crc32``): the pieces must then cover the whole file.
    """

    def __init__(
        self,
        path: str,
        stats: ReadStats | None = None,
        pool: Executor | None = None,
        checksum: bool = False,
    ):
        self.path = path
        self.stats = stats or ReadStats()
        self.pool = pool
        self.checksum = checksum
        self._pending: list[Future] = []
        # The task being gathered: file runs, mapped copies, staged reads, and their bytes.
        self._runs: list[Run] = []
        self._copies: list[tuple[TensorEntry, Box, torch.Tensor]] = []
        self._staged: list[StagedRead] = []  # reads bound for a CUDA tensor
        self._gathered = 0
        self._devices: set[torch.device] = set()  # where staged copies went
        self._crcs: list[CrcRecord] = []
        # Byte views of the destinations' storages, by address: one per storage, sliced
        # per tensor (a model in its weight block has one storage for every parameter).
        self._storage_views: dict[int, memoryview] = {}
        self.fd = open_for_read(path)

    def byte_view(self, dst: torch.Tensor) -> memoryview:
        """The bytes of ``dst`` (a contiguous CPU tensor) as a memoryview that keeps its
        storage alive. A storage that holds more than ``dst`` (a model's weight block)
        gets one view, kept until ``wait()`` or ``close()`` and sliced for each of its
        tensors: far cheaper than going through ``dst.numpy()`` for every one of many
        tensors."""
        storage = dst.untyped_storage()
        base, size = storage.data_ptr(), storage.nbytes()
        if size == dst.nbytes:  # a tensor of its own storage: its view is not kept
            return storage_bytes(dst, base, base + size)
        view = self._storage_views.get(base)
        if view is None:
            view = self._storage_views[base] = storage_bytes(dst, base, base + size)
        start = dst.data_ptr() - base
        return view[start : start + dst.nbytes]

    def read_run(self, offset: int, view: memoryview, wait: bool = False) -> None:
        """Read ``len(view)`` bytes at file ``offset`` into ``view``; queued for the pool
        unless ``wait``."""
        self._queue_run(offset, len(view), view, wait)

    def read_unclaimed(self, offset: int, length: int) -> None:
        """Read bytes that no destination takes (header, padding) for the checksum."""
        self._queue_run(offset, length, None, False)

    def _queue_run(self, offset: int, length: int, view: memoryview | None, wait: bool) -> None:
        self.stats.bytes_read += length
        if self.pool is None or wait:
            self._crcs += self._read([(offset, length, view)])
            return
        for start in range(0, length, _TASK_BYTES):  # a big run over several tasks
            n = min(_TASK_BYTES, length - start)
            piece = None if view is None else view[start : start + n]
            self._runs.append((offset + start, n, piece))
            self._gather(n)

    def copy_box(self, entry: TensorEntry, box: Box, dst: torch.Tensor, wait: bool) -> None:
        """Copy ``box`` of ``entry`` (not one run of the file) into ``dst`` with one
        strided copy (queued for the pool unless ``wait``): out of a private mapping of
        the tensor's pages, gone on return; or, for a tensor of at most
        ``_SMALL_TENSOR_BYTES``, out of the whole tensor read into a scratch buffer."""
        self.stats.bytes_read += entry.end - entry.start if _small(entry) else dst.nbytes
        if self.pool is None or wait:
            self._copy_box(entry, box, dst)
        else:
            self._copies.append((entry, box, dst))
            self._gather(dst.nbytes)

    def stage_run(self, offset: int, dst: torch.Tensor, wait: bool = False) -> None:
        """Read ``dst.numel()`` bytes at file ``offset`` into ``dst``, a 1-D uint8 tensor on
        a CUDA device, through pinned buffers (``CudaStaging``); queued for the pool
        unless ``wait``."""
        n, step = dst.numel(), staging.STAGE_BYTES
        reads = [StagedRead(offset + a, min(step, n - a), dst[a : a + step])
                 for a in range(0, n, step)]  # fmt: skip
        self._stage(reads, dst.device, wait)

    def stage_box(
        self, entry: TensorEntry, box: Box, dst: torch.Tensor, strided: bool, wait: bool = False
    ) -> None:
        """Copy ``box`` of ``entry`` into ``dst``, a contiguous tensor on a CUDA device (of
        any dtype) through pinned buffers. The rows of the first dim that the box spans
        go to the device, where the box is copied out of them (and cast); but a
        ``strided`` box (not one run of the file) of a tensor of more than
        ``_SMALL_TENSOR_BYTES`` is copied into the buffers out of a mapping of those
        rows, so only the box's pages are read (a row-parallel rank's columns)."""
        on_host = strided and not _small(entry)
        reads = list(box_reads(entry.start, entry.dtype, entry.shape, box, dst, on_host))
        self._stage(reads, dst.device, wait)

    def _stage(self, reads: list[StagedRead], device: torch.device, wait: bool) -> None:
        self._devices.add(device)
        for read in reads:
            self.stats.bytes_read += read.nbytes
        if self.pool is None or wait:
            own = CudaStaging()  # gone on return: no pinned memory kept by this thread
            self._crcs += run_staged(self.fd, self.path, reads, own, self.checksum)
            if own.stream is not None:
                own.stream.synchronize()
            return
        for read in reads:
            self._staged.append(read)
            self._gather(read.nbytes)

    def _gather(self, nbytes: int) -> None:
        self._gathered += nbytes
        if self._gathered >= _TASK_BYTES or len(self._runs) >= IOV_MAX:
            self.submit()

    def submit(self) -> None:
        """Hand the pieces gathered so far to the pool (``wait`` does too)."""
        if self._runs or self._copies or self._staged:
            runs, copies, staged = self._runs, self._copies, self._staged
            self._runs, self._copies, self._staged, self._gathered = [], [], [], 0
            self._pending.append(self.pool.submit(self._run_task, runs, copies, staged))

    def _run_task(self, runs: list[Run], copies: list, staged: list) -> list[CrcRecord]:
        crcs = self._read(runs)
        for entry, box, dst in copies:
            self._copy_box(entry, box, dst)
        if staged:
            crcs += run_staged(self.fd, self.path, staged, staging.pool_staging, self.checksum)
        return crcs

    def _copy_box(self, entry: TensorEntry, box: Box, dst: torch.Tensor) -> None:
        if _small(entry):
            src = _scratch_bytes(entry.end - entry.start)
            preadv_fully(self.fd, [memoryview(src.numpy())], entry.start, self.path)
            copy_out(src, entry.dtype, entry.shape, box, dst)
            return
        copy_mapped(self.fd, entry.start, entry.end, (entry.dtype, entry.shape, box), dst)

    def _read(self, runs: list[Run]) -> list[CrcRecord]:
        """Runs that follow each other in the file (tensors stored back to back) are
        read with one preadv into their several buffers."""
        runs = sorted(runs, key=lambda r: r[0])
        crcs: list[CrcRecord] = []
        i = 0
        while i < len(runs):
            start = end = runs[i][0]
            group: list[Run] = []
            while i < len(runs) and runs[i][0] == end and len(group) < IOV_MAX:
                group.append(runs[i])
                end += runs[i][1]
                i += 1
            views = _views(group)
            preadv_fully(self.fd, views, start, self.path)
            if self.checksum:
                crc = 0
                for view in views:
                    crc = zlib_ng.crc32(view, crc)
                crcs.append((start, end - start, crc))
        return crcs

    def wait(self) -> None:
        if self.pool is not None:
            self.submit()
        pending, self._pending = self._pending, []
        futures.wait(pending)  # all of them, so none still reads after an error
        # The reads are done: their destinations' storages need not stay alive (a caller
        # that fills and frees one tensor at a time, ``reshard_files``, waits per tensor).
        self._storage_views.clear()
        for device in self._devices:  # the pool threads' copies, on their own streams
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self._devices.clear()
        for f in pending:
            self._crcs += f.result()

    def crc32(self) -> int:
        """The CRC-32 of the bytes read (``checksum``), which cover the file from byte 0."""
        crc = pos = 0
        for offset, length, value in sorted(self._crcs):
            if offset != pos:
                raise RuntimeError(f"{self.path}: bytes [{pos}, {offset}) were not read.")
            crc = zlib_ng.crc32_combine(crc, value, length)
            pos += length
        return crc

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._storage_views.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _views(group: list[Run]) -> list[memoryview]:
    """The destinations of runs; bytes only checksummed go to this thread's scratch."""
    unclaimed = sum(n for _, n, view in group if view is None)
    if not unclaimed:
        return [view for _, _, view in group]
    scratch, pos, views = _scratch_bytes(unclaimed), 0, []
    for _, n, view in group:
        if view is None:
            view = memoryview(scratch[pos : pos + n].numpy())
            pos += n
        views.append(view)
    return views


def close_all(files: Sequence[FileReader]) -> Exception | None:
    """Close every file (each waits for its reads); the first error, if any."""
    first = None
    for f in files:
        try:
            f.close()
        except Exception as e:
            first = first or e
    return first


def read_tensors(
    headers: Sequence[FileHeader],
    targets: dict[str, torch.Tensor],
    expected_crcs: Sequence[int | None] | None = None,
    num_threads: int | None = None,
) -> int:
    """Read the tensors of ``headers`` that ``targets`` names into ``targets[name]``
    (shapes and dtypes already checked), with ``num_threads`` threads; read whole and
    verify each file whose expected CRC-32 is given. Returns the number of bytes read."""
    crcs = list(expected_crcs) if expected_crcs is not None else [None] * len(headers)
    if len(crcs) != len(headers):
        raise ValueError(f"{len(headers)} files but {len(crcs)} expected CRC-32 values.")
    after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dst, contiguous copy) pairs
    stats = ReadStats()
    files: list[FileReader] = []
    threads = num_threads or default_num_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="weight-reader") as pool:
        try:
            for header, crc in zip(headers, crcs):
                files.append(FileReader(header.path, stats, pool, checksum=crc is not None))
                _queue_tensors(files[-1], header, targets, after)
        except BaseException:
            close_all(files)
            raise
        error = close_all(files)
        if error is not None:
            raise error
    for dst, tmp in after:
        dst.copy_(tmp)
    for file, expected in zip(files, crcs):
        if expected is None:
            continue
        crc = file.crc32()
        if crc != expected:
            raise ShardFileError(
                f"Checksum mismatch for {file.path}: CRC-32 {crc:08x}, expected "
                f"{expected:08x}. The file is corrupt; save the checkpoint again."
            )
    return stats.bytes_read


def _queue_tensors(
    file: FileReader,
    header: FileHeader,
    targets: dict[str, torch.Tensor],
    after: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Queue the reads of ``header``'s tensors that ``targets`` names; with a checksum,
    the bytes between them too (header, padding, tensors not wanted)."""
    pos = 0
    for entry in header.tensors:
        dst = targets.get(entry.name)
        if dst is None or entry.end == entry.start:
            continue  # not wanted (e.g. already mapped); a checksum still covers it
        if file.checksum and entry.start > pos:
            file.read_unclaimed(pos, entry.start - pos)
        pos = entry.end
        if not dst.is_contiguous():
            tmp = torch.empty(entry.shape, dtype=entry.dtype, device=dst.device)
            after.append((dst, tmp))
            dst = tmp
        if staging.staged(dst):
            file.stage_run(entry.start, dst.view(-1).view(torch.uint8))
        else:
            file.read_run(entry.start, file.byte_view(dst))
    if file.checksum and pos < header.size:
        file.read_unclaimed(pos, header.size - pos)
