"""Safetensors files read and written directly, for the sharded-state format.

Writing streams each tensor's bytes once and computes the file's CRC-32 on the way.
Reading parses the header here (so a truncated or inconsistent file is named before any
data is read) and then reads each tensor's bytes straight into its destination tensor:
no intermediate copy on the CPU, one sequential pass over the file.

The files are standard safetensors (8-byte little-endian header length, JSON header,
data), readable by ``safetensors.safe_open`` and by upstream vLLM.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# safetensors dtype codes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a header (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Largest single read; Linux returns at most ~2 GiB per read() anyway.
_READ_CHUNK = 1 << 30


class ShardFileError(ValueError):
    """A shard file is missing, truncated, corrupt, or does not match the model."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class FileHeader:
    path: str
    data_start: int  # 8 + header length
    size: int  # bytes on disk
    tensors: tuple[TensorEntry, ...]  # in file order


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (the spelling the manifest uses)."""
    return str(dtype).removeprefix("torch.")


def read_header(path: str) -> FileHeader:
    """Parse and check a safetensors header; raises ShardFileError naming ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ShardFileError(
                    f"{path} is truncated: {size} bytes, too short for a safetensors header."
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ShardFileError(
                    f"{path} is truncated or not a safetensors file: its header length field "
                    f"says {n} bytes, the file has {size}."
                )
            raw = f.read(n)
    except OSError as e:
        raise ShardFileError(f"Cannot read shard file {path}: {e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:
        raise ShardFileError(f"{path} has a corrupt safetensors header ({e}).") from e
    data_start = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFileError(f"{path}: bad header entry for {name!r}: {info!r} ({e}).") from e
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ShardFileError(
                f"{path}: header entry {name!r} spans bytes [{begin}, {end}), which does not "
                f"fit shape {list(shape)} of {info['dtype']}."
            )
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: e.start)
    data_end = max((e.end for e in entries), default=data_start)
    if data_end != size:
        what = "truncated" if data_end > size else "longer than its header describes"
        raise ShardFileError(
            f"{path} is {what}: its header describes {data_end} bytes, the file has {size}."
        )
    return FileHeader(path, data_start, size, tuple(entries))


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_file(
    path: str, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> tuple[int, int]:
    """Write ``tensors`` as a safetensors file; returns (size in bytes, CRC-32 of the file).

    Tensors are laid out by element size, largest first, so every tensor is aligned to
    its element size (the header is padded to 8 bytes): mmap-based readers need that.
    """
    items = sorted(tensors, key=lambda kv: -kv[1].element_size())  # stable: keeps order
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
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    crc = zlib.crc32(prefix)
    with open(path, "wb") as f:
        f.write(prefix)
        for _, t in items:
            data = _as_bytes(t)
            f.write(data)
            crc = zlib.crc32(data, crc)
        f.flush()
        os.fsync(f.fileno())
    return len(prefix) + offset, crc


def _read_fully(f, view: memoryview, path: str) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + _READ_CHUNK])
        if not n:
            raise ShardFileError(f"{path} ended early (truncated while being read?).")
        done += n


def read_into(header: FileHeader, targets: dict[str, torch.Tensor], checksum: bool) -> int | None:
    """Read every tensor of ``header`` into ``targets[name]``; returns the file's CRC-32
    when ``checksum`` (the whole file is then read, header included), else None.

    Shapes and dtypes must already have been checked. A CPU, contiguous target is read
    into directly; others go through one temporary CPU tensor.
    """
    crc = None
    with open(header.path, "rb", buffering=0) as f:
        pos = 0
        if checksum:
            prefix = bytearray(header.data_start)
            _read_fully(f, memoryview(prefix), header.path)
            crc = zlib.crc32(prefix)
            pos = header.data_start
        for entry in header.tensors:
            if checksum and entry.start > pos:  # bytes no tensor claims still count
                gap = bytearray(entry.start - pos)
                f.seek(pos)
                _read_fully(f, memoryview(gap), header.path)
                crc = zlib.crc32(gap, crc)
            dst = targets[entry.name]
            direct = dst.device.type == "cpu" and dst.is_contiguous()
            buf = dst if direct else torch.empty(entry.shape, dtype=entry.dtype)
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
            f.seek(entry.start)
            _read_fully(f, view, header.path)
            if checksum:
                crc = zlib.crc32(view, crc)
            if not direct:
                dst.copy_(buf)
            pos = entry.end
    return crc


def file_crc32(path: str) -> int:
    """CRC-32 of a whole file, read in large chunks."""
    crc = 0
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc
