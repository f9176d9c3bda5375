"""Read safetensors files straight into the tensors that hold them, with several threads.

Every file is cut into fixed windows of ``WINDOW`` bytes. A window becomes a few
``os.preadv`` calls, each reading one contiguous byte range of the file straight into the
destination tensors' memory (up to ``IOV_MAX`` tensors per call, no intermediate copy on
the CPU). Windows are spread over a thread pool; ``preadv`` and zlib-ng's SIMD ``crc32``
release the GIL, so the threads read, fault in destination pages and checksum in
parallel. The per-window CRC-32s of a file are combined in file order
(``crc32_combine``) into the file's CRC-32.

Destinations that are not plain CPU memory (a CUDA tensor) are read into a pinned staging
buffer of the thread and copied with ``non_blocking=True`` on the thread's own stream;
each thread alternates between two staging buffers, so the next read overlaps the copy
(``safetensors_io.CudaStaging``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from zlib_ng import zlib_ng

from vllm.model_executor.model_loader.safetensors_io import (
    IOV_MAX,
    STAGE_BYTES,
    CudaStaging,
    FileHeader,
    ShardFileError,
    open_for_read,
    preadv_fully,
)

WINDOW = STAGE_BYTES  # a window fits one staging buffer
_MAX_THREADS = 8


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


# ---------------------------------------------------------------------------------------
# The read plan.


@dataclass
class _Piece:
    start: int  # absolute file offset
    end: int
    dst: torch.Tensor | None  # 1-D uint8 view of the destination bytes; None: checksum only


@dataclass
class _Window:
    file: int  # index into the plan's files
    start: int
    end: int
    pieces: list[_Piece] = field(default_factory=list)


@dataclass
class _File:
    header: FileHeader
    checksum: bool
    fd: int = -1


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _windows(index: int, file: _File, pieces: list[_Piece]) -> list[_Window]:
    """Cut the file's pieces at WINDOW boundaries; with a checksum, the bytes no tensor
    claims (header, padding) become pieces too, so the windows cover the whole file."""
    size = file.header.size
    if file.checksum:
        covered, pos = [], 0
        for p in pieces:
            if p.start > pos:
                covered.append(_Piece(pos, p.start, None))
            covered.append(p)
            pos = p.end
        if pos < size:
            covered.append(_Piece(pos, size, None))
        pieces = covered
    windows: dict[int, _Window] = {}
    for p in pieces:
        start = p.start
        while start < p.end:
            w = start // WINDOW
            end = min(p.end, (w + 1) * WINDOW)
            window = windows.get(w)
            if window is None:
                window = windows[w] = _Window(index, start, end)
            window.end = end
            dst = None if p.dst is None else p.dst[start - p.start : end - p.start]
            window.pieces.append(_Piece(start, end, dst))
            start = end
    return [windows[w] for w in sorted(windows)]


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.scratch: torch.Tensor | None = None  # bytes only the checksum reads


class ParallelReader:
    """Reads a set of files into destination tensors; see the module docstring."""

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads or default_num_threads()
        self._local = _ThreadState()
        self._staging = CudaStaging()

    def read(
        self,
        headers: Sequence[FileHeader],
        targets: dict[str, torch.Tensor],
        expected_crcs: Sequence[int | None] | None = None,
    ) -> int:
        """Read the tensors of ``headers`` that ``targets`` names into ``targets[name]``
        (shapes and dtypes already checked); verify each file whose expected CRC-32 is
        given. Returns the number of bytes read."""
        crcs = list(expected_crcs) if expected_crcs is not None else [None] * len(headers)
        if len(crcs) != len(headers):
            raise ValueError(f"{len(headers)} files but {len(crcs)} expected CRC-32 values.")
        files = [_File(h, crc is not None) for h, crc in zip(headers, crcs)]
        after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dst, contiguous copy) pairs
        windows: list[_Window] = []
        for i, file in enumerate(files):
            pieces = []
            for entry in file.header.tensors:
                dst = targets.get(entry.name)
                if dst is None:
                    continue  # not wanted (e.g. already mapped); a checksum still covers it
                if not dst.is_contiguous():
                    tmp = torch.empty(entry.shape, dtype=entry.dtype, device=dst.device)
                    after.append((dst, tmp))
                    dst = tmp
                if entry.end > entry.start:
                    pieces.append(_Piece(entry.start, entry.end, _byte_view(dst)))
            windows += _windows(i, file, pieces)
        try:
            for file in files:
                file.fd = open_for_read(file.header.path)
            results = self._run(files, windows)
        finally:
            for file in files:
                if file.fd >= 0:
                    os.close(file.fd)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for dst, tmp in after:
            dst.copy_(tmp)
        for i, (file, expected) in enumerate(zip(files, crcs)):
            if expected is None:
                continue
            crc = 0
            for window, (_, window_crc) in zip(windows, results):
                if window.file == i:
                    crc = zlib_ng.crc32_combine(crc, window_crc, window.end - window.start)
            if crc != expected:
                raise ShardFileError(
                    f"Checksum mismatch for {file.header.path}: CRC-32 {crc:08x}, expected "
                    f"{expected:08x}. The file is corrupt; save the checkpoint again."
                )
        return sum(nbytes for nbytes, _ in results)

    def _run(self, files: list[_File], windows: list[_Window]) -> list[tuple[int, int]]:
        threads = min(self.num_threads, len(windows))
        if threads <= 1:
            return [self._read_window(files, w) for w in windows]
        pool = ThreadPoolExecutor(threads, thread_name_prefix="weight-reader")
        try:
            futures = [pool.submit(self._read_window, files, w) for w in windows]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_window(self, files: list[_File], window: _Window) -> tuple[int, int]:
        """Read one window; returns (bytes read, CRC-32 of the window or 0)."""
        file = files[window.file]
        staged = [p for p in window.pieces if p.dst is not None and not p.dst.is_cpu]
        staging = self._staging.buffer(staged[0].dst.device) if staged else None
        crc = 0
        nbytes = 0
        run: list[tuple[_Piece, memoryview]] = []
        for piece in window.pieces:
            if run and (run[-1][0].end != piece.start or len(run) == IOV_MAX):
                nbytes += self._read_run(file, run)
                run = []
            run.append((piece, self._buffer_for(piece, window, staging)))
        if run:
            nbytes += self._read_run(file, run)
        if file.checksum:
            # With a checksum the pieces cover the window: hash them in file order.
            for piece in window.pieces:
                crc = zlib_ng.crc32(self._buffer_for(piece, window, staging), crc)
        if staged:
            start = window.start
            self._staging.copy([(p.dst, staging[p.start - start : p.end - start]) for p in staged])
        return nbytes, crc

    def _buffer_for(self, piece: _Piece, window: _Window, staging: torch.Tensor | None):
        a, b = piece.start - window.start, piece.end - window.start
        if piece.dst is not None and piece.dst.is_cpu:
            return memoryview(piece.dst.numpy())
        if piece.dst is not None:
            return memoryview(staging[a:b].numpy())
        local = self._local
        if local.scratch is None:
            local.scratch = torch.empty(WINDOW, dtype=torch.uint8)
        return memoryview(local.scratch[a:b].numpy())

    @staticmethod
    def _read_run(file: _File, run: list[tuple[_Piece, memoryview]]) -> int:
        """One contiguous byte range of the file into its buffers."""
        views = [view for _, view in run]
        return preadv_fully(file.fd, views, run[0][0].start, file.header.path)
