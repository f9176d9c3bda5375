"""Resharding: a rank's slices at TP size N, read from a checkpoint saved at TP size M.

A checkpoint saved at M holds, per rank, each tensor's local slice; the tensor's
``ShardSpec`` says which global rows (along its split dimension) that slice holds, at
any TP size. Intersecting what a rank needs at N with what each saved rank holds gives
per tensor a list of copies (saved rank, rows there, rows here): a row range of a
row-split tensor, or the same column range of every row of a column-split one. Rows
that several saved ranks hold (KV heads replicated at M) are read once; a replicated
tensor is read whole from one saved rank. No rank reads a whole foreign file.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vllm.model_executor.layers.shard_spec import ShardSpec, get_shard_spec
from vllm.model_executor.model_loader.safetensors.format import ShardFileError
from vllm.model_executor.model_loader.safetensors.reader import (
    ReadStats,
    close_all,
    default_num_threads,
)
from vllm.model_executor.model_loader.safetensors.slices import SafetensorsFile, TensorSlice


@dataclass(frozen=True)
class Copy:
    """``length`` rows along the split dimension, from ``src_start`` in saved rank
    ``src_rank``'s slice to ``dst_start`` in this rank's; ``length`` -1: the whole
    tensor (a replicated one)."""

    src_rank: int
    src_start: int
    dst_start: int
    length: int


def plan_copies(spec: ShardSpec, src_tp: int, dst_rank: int, dst_tp: int) -> list[Copy]:
    """The copies that fill rank ``dst_rank`` of ``dst_tp``'s slice from a save at
    ``src_tp``; rows that no copy covers are padding (vocabulary rows past the real ones).
    A replicated tensor comes whole from one saved rank, spread by ``dst_rank``."""
    if spec.dim is None:
        return [Copy(dst_rank % src_tp, 0, 0, -1)]
    # The saved rank holding the same part of the model first: rows replicated at src_tp
    # then come from a file this rank reads anyway.
    first = dst_rank * src_tp // dst_tp
    order = [(first + i) % src_tp for i in range(src_tp)]
    held = {s: spec.local_pieces(s, src_tp) for s in order}
    copies: list[Copy] = []
    for want in spec.local_pieces(dst_rank, dst_tp):
        todo = [(want.global_start, want.global_start + want.length)]
        for s in order:
            for have in held[s]:
                todo = _take(todo, have, s, want, copies)
            if not todo:
                break
        if todo:
            raise ValueError(
                f"Global rows {todo} of a tensor split as {spec} are held by no saved rank "
                f"at tensor_parallel_size={src_tp}."
            )
    return sorted(copies, key=lambda c: c.dst_start)


def _take(todo, have, src_rank: int, want, copies: list[Copy]) -> list[tuple[int, int]]:
    """Record copies of what ``have`` (a saved piece) holds of the ``todo`` global ranges
    of ``want`` (a wanted piece); return the ranges still wanted."""
    lo, hi = have.global_start, have.global_start + have.length
    left = []
    for a, b in todo:
        x, y = max(a, lo), min(b, hi)
        if x >= y:
            left.append((a, b))
            continue
        src_start = have.local_start + (x - lo)
        copies.append(Copy(src_rank, src_start, want.local_start + (x - want.global_start), y - x))
        left += [r for r in ((a, x), (y, b)) if r[0] < r[1]]
    return left


def read_resharded(
    targets: dict[str, torch.Tensor],
    source_files: dict[int, list[str]],
    src_tp: int,
    rank: int,
    tp_size: int,
    stats: ReadStats,
) -> None:
    """Fill ``targets`` (this rank's state tensors at ``tp_size``, by name) from a save at
    ``src_tp`` (``source_files``: saved rank -> its files), reading only what this rank's
    slices are made of. A saved tensor of another shape than its spec gives at ``src_tp``
    is refused: the layout is then not the one this model states."""
    after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (strided destination, buffer)
    with ThreadPoolExecutor(default_num_threads(), thread_name_prefix="weight-reader") as pool:
        saved = SavedRanks(source_files, stats, pool)
        try:
            for name, dst in targets.items():
                fill_resharded(name, dst, get_shard_spec(dst), saved, src_tp, rank, tp_size, after)
        except BaseException:
            saved.close()
            raise
        error = saved.close()
        if error is not None:
            raise error
    for dst, buffer in after:
        dst.copy_(buffer)


class SavedRanks:
    """A save's tensors by saved rank, as lazy slices: a rank's files are opened (only
    their headers read) the first time one of its tensors is asked for."""

    def __init__(self, source_files: dict[int, list[str]], stats: ReadStats, pool: Executor):
        self.source_files = source_files
        self.stats = stats
        self.pool = pool
        self._opened: dict[int, dict[str, TensorSlice]] = {}
        self._files: list[SafetensorsFile] = []

    def get(self, src_rank: int, name: str) -> TensorSlice:
        if src_rank not in self._opened:
            slices: dict[str, TensorSlice] = {}
            for path in self.source_files[src_rank]:
                self._files.append(SafetensorsFile(path, self.stats, self.pool))
                self.stats.bytes_read += self._files[-1].header.data_start
                for key in self._files[-1].keys():
                    slices[key] = self._files[-1].get_slice(key)
            self._opened[src_rank] = slices
        src = self._opened[src_rank].get(name)
        if src is None:
            raise ShardFileError(
                f"{name} is missing from the shard files of saved rank {src_rank} "
                f"({', '.join(self.source_files[src_rank])})."
            )
        return src

    def wait(self) -> None:
        """Return when every queued read is done; raises the first read error."""
        for f in self._files:
            f.wait()

    def close(self) -> Exception | None:
        """Close every opened file (each waits for its reads); the first error, if any."""
        return close_all(self._files)


def fill_resharded(
    name: str,
    dst: torch.Tensor,
    spec: ShardSpec,
    saved: SavedRanks,
    src_tp: int,
    rank: int,
    tp_size: int,
    after: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Queue the reads that fill ``dst`` (rank ``rank``'s slice at ``tp_size`` of tensor
    ``name``, split as ``spec``) from a save at ``src_tp``, and zero its padding rows. The
    bytes are in place after ``saved.wait()`` and the ``(destination, buffer)`` copies
    appended to ``after`` (column ranges, read through a buffer)."""
    for copy in plan_copies(spec, src_tp, rank, tp_size):
        src = saved.get(copy.src_rank, name)
        _check_saved_shape(src, dst, spec, src_tp, name)
        if copy.length < 0:
            _read(src, dst, after)
            continue
        part = src.narrow(spec.dim, copy.src_start, copy.length)
        _read(part, dst.narrow(spec.dim, copy.dst_start, copy.length), after)
    if spec.dim is not None:
        _zero_padding(dst, spec, rank, tp_size)


def _check_saved_shape(
    src: TensorSlice, dst: torch.Tensor, spec: ShardSpec, src_tp: int, name: str
) -> None:
    want = list(dst.shape)
    if spec.dim is not None:
        want[spec.dim] = spec.local_size(src_tp)
    if src.get_shape() != want or src.dtype != dst.dtype:
        raise ShardFileError(
            f"{name} in {src.file.path} is {src.dtype} {src.get_shape()}, but a slice saved at "
            f"tensor_parallel_size={src_tp} of this model's layout is {dst.dtype} {want}: the "
            "checkpoint cannot be resharded. Load it at the tensor_parallel_size it was saved "
            "with, or save it again (or `vllm reshard` it) from the original model."
        )


def _read(src: TensorSlice, dst: torch.Tensor, after: list) -> None:
    """Queue the read of ``src`` into ``dst``. A strided ``dst`` (a column range) on the
    CPU is copied into in the pool; elsewhere it gets a buffer, copied in once every
    read is done."""
    if src.reads_into(dst):
        src.read_into(dst)
        return
    if src.copies_into(dst):
        src.copy_into(dst)
        return
    buffer = torch.empty(src.get_shape(), dtype=src.dtype, device=dst.device)
    src.read_into(buffer)
    after.append((dst, buffer))


def _zero_padding(dst: torch.Tensor, spec: ShardSpec, rank: int, tp_size: int) -> None:
    """Zero this rank's rows that hold no global row (vocabulary padding)."""
    pos = 0
    for piece in sorted(spec.local_pieces(rank, tp_size), key=lambda p: p.local_start):
        if piece.local_start > pos:
            dst.narrow(spec.dim, pos, piece.local_start - pos).zero_()
        pos = piece.local_start + piece.length
    if pos < dst.shape[spec.dim]:
        dst.narrow(spec.dim, pos, dst.shape[spec.dim] - pos).zero_()
