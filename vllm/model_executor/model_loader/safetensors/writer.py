"""Writing safetensors files: each tensor's bytes streamed once, with the file's CRC-32.

The files are standard safetensors, readable by ``safetensors.safe_open`` and by upstream
vLLM; their data starts at a page boundary, so a file can be mapped over memory laid out
the same way (``sharded_state.weight_region``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from zlib_ng import zlib_ng

from vllm.model_executor.model_loader.safetensors.fileio import (
    IOV_MAX,
    storage_bytes,
    writev_fully,
)
from vllm.model_executor.model_loader.safetensors.format import DTYPE_CODES, PAGE_SIZE

# Largest single write: Linux moves at most ~2 GiB per call; smaller chunks let the
# checksum of one chunk overlap the write of the next.
_WRITE_CHUNK = 64 << 20


def plan_layout(
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, dict], int]:
    """Where ``write_file`` puts each tensor: (the tensors in file order, the header
    entries without ``__metadata__``, the data bytes).

    Tensors are laid out by element size, largest first (stable), so every tensor is
    aligned to its element size with no gap between tensors (safetensors allows none).
    """
    items = sorted(tensors, key=lambda kv: -kv[1].element_size())
    header: dict[str, dict] = {}
    offset = 0
    for name, t in items:
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"Cannot save {name!r}: dtype {t.dtype} has no safetensors code.")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return items, header, offset


def header_json(header: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """The JSON text ``write_file`` writes for ``header`` (``plan_layout``'s entries),
    before its padding."""
    return json.dumps(
        {**header, "__metadata__": {"format": "pt", **(metadata or {})}}, separators=(",", ":")
    ).encode()


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.is_mkldnn:  # a weight packed for the CPU: dense again, one tensor at a time
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _crc32_many(views: list[memoryview], crc: int) -> int:
    for view in views:
        crc = zlib_ng.crc32(view, crc)
    return crc


def _runs(items: list[tuple[str, torch.Tensor]]) -> Iterator[memoryview]:
    """The tensors' bytes in file order, tensors adjacent in one CPU storage merged into
    one view: a model laid out as the file is (``weight_region``) is a single view."""
    run: torch.Tensor | None = None  # a plain tensor's storage, from ``start`` on
    start = end = 0
    for _, t in items:
        plain = t.device.type == "cpu" and not t.is_mkldnn and t.is_contiguous()
        if plain and run is not None and t.data_ptr() == end:
            storage = t.untyped_storage()
            if storage.data_ptr() == run.untyped_storage().data_ptr():
                end += t.numel() * t.element_size()
                continue
        if run is not None:
            yield storage_bytes(run, start, end)
            run = None
        if plain:
            run, start = t, t.data_ptr()
            end = start + t.numel() * t.element_size()
        else:
            yield _as_bytes(t)
    if run is not None:
        yield storage_bytes(run, start, end)


def _write_groups(views: Iterable[memoryview], chunk: int) -> Iterator[list[memoryview]]:
    """``views`` as groups of about ``chunk`` bytes (at most IOV_MAX buffers): one
    writev each, however small the pieces are. A view of more than one chunk ends its
    group and is let go before the next view is asked for, so a source that makes its
    tensors as they are written (``reshard_files``) holds about one at a time."""
    group: list[memoryview] = []
    size = 0
    for data in views:
        large = len(data) > chunk
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            group.append(piece)
            size += len(piece)
            if size >= chunk or len(group) == IOV_MAX:
                yield group
                group, size = [], 0
        if large and group:
            yield group
            group, size = [], 0
        data = piece = None  # noqa: F841 (let the view go before the next one is made)
    if group:
        yield group


def write_file(
    path: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    checksum: bool = True,
) -> tuple[int, int | None]:
    """Write ``tensors`` as a safetensors file; returns (size in bytes, CRC-32 of the file,
    or None without ``checksum``).

    Tensors are laid out by ``plan_layout``; tensors adjacent in memory are written as
    one piece (see ``write_raw``).
    """
    items, header, _ = plan_layout(tensors)
    return write_raw(path, header_json(header, metadata), _runs(items), checksum)


def write_raw(
    path: str,
    header: bytes,
    data: Iterable[memoryview],
    checksum: bool = True,
    chunk: int = _WRITE_CHUNK,
) -> tuple[int, int | None]:
    """Write a safetensors file from its header's JSON text (``header_json``) and its data
    bytes in order; returns (size in bytes, CRC-32 of the file, or None). Small views
    are gathered into writes of about ``chunk`` bytes (the views held at once).

    The header is padded with spaces so the data starts at a multiple of ``PAGE_SIZE``:
    every tensor is aligned to its element size (mmap-based readers need that), and the
    data can be mapped in one piece over memory laid out the same way
    (``weight_region``). The bytes go to the file in large writes while another thread
    computes the CRC-32 of the same bytes (zlib-ng's SIMD crc32; both release the GIL),
    so the checksum costs little time.
    """
    header += b" " * (-(8 + len(header)) % PAGE_SIZE)
    prefix = struct.pack("<Q", len(header)) + header
    crc = zlib_ng.crc32(prefix) if checksum else None
    size = len(prefix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writev_fully(fd, [memoryview(prefix)])
        with ThreadPoolExecutor(1, thread_name_prefix="crc32") as hasher:
            for group in _write_groups(data, chunk):
                pending = hasher.submit(_crc32_many, group, crc) if checksum else None
                writev_fully(fd, group)
                size += sum(len(v) for v in group)
                if pending is not None:
                    crc = pending.result()
                del group, pending  # before the next group is made
        os.fsync(fd)
    except OSError as e:
        if e.filename is not None:
            raise
        # os.writev and os.fsync name no file: a full disk would say only "No space left".
        raise OSError(e.errno, f"Cannot write {path}: {e.strerror}", path) from e
    finally:
        os.close(fd)
    return size, crc
