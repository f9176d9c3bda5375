"""What a safetensors file is: its header, parsed and checked, and its dtype names.

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype code,
shape and data offsets; optionally ``__metadata__``), then the data. ``read_header``
checks a header the way the safetensors library does, so that a truncated or
inconsistent file is named before any data is read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

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
# Written files' data starts at a multiple of this (the header is padded with spaces).
PAGE_SIZE = mmap.PAGESIZE


class ShardFileError(ValueError):
    """A shard file is missing, truncated, corrupt, or does not match the model."""


Box = tuple[tuple[int, int], ...]  # a tensor's (start, end) along each dim
# How to read bytes as a tensor and which box of it to take: (dtype, shape, box).
Arrange = tuple[torch.dtype, tuple[int, ...], Box]


class TensorEntry(NamedTuple):  # a NamedTuple: built per tensor, cheaper than a dataclass
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


def header_specs(path: str) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], int]:
    """(name -> (shape, dtype) of every tensor in the file, file size): what a
    strictness check compares with the state a load will ask for."""
    header, _, size = read_header_json(path)
    header.pop("__metadata__", None)
    specs = {k: (tuple(e["shape"]), DTYPES[e["dtype"]]) for k, e in header.items()}
    return specs, size


def read_header_json(path: str) -> tuple[dict, int, int]:
    """A safetensors file's header as parsed JSON, with its data start (8 + header length)
    and the file's size; raises ShardFileError naming ``path``. Only the JSON is checked."""
    raw, data_start, size = read_header_bytes(path)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:
        raise ShardFileError(f"{path} has a corrupt safetensors header ({e}).") from e
    return header, data_start, size


def read_header_bytes(path: str) -> tuple[bytes, int, int]:
    """A safetensors file's header (its JSON text with the padding), its data start and
    the file's size; raises ShardFileError naming ``path``."""
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
    if len(raw) < n:
        raise ShardFileError(f"{path} is truncated: it ends inside its header.")
    return raw, 8 + n, size


def read_header(path: str) -> FileHeader:
    """Parse and check a safetensors header; raises ShardFileError naming ``path``."""
    header, data_start, size = read_header_json(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (
                not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())
            ):
                raise ShardFileError(
                    f"{path}: __metadata__ must map names to strings, got {info!r:.80}."
                )
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
        if end - begin != numel * dtype.itemsize or begin < 0 or any(d < 0 for d in shape):
            raise ShardFileError(
                f"{path}: header entry {name!r} spans bytes [{begin}, {end}), which does not "
                f"fit shape {list(shape)} of {info['dtype']}."
            )
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.start, e.end))
    # As the safetensors library: the tensors tile the data section, in order, with no
    # overlap (two names for the same bytes) and no gap.
    data_end = data_start
    for e in entries:
        if e.start != data_end:
            raise ShardFileError(
                f"{path}: header entry {e.name!r} starts at data byte {e.start - data_start}, "
                f"but the tensors before it end at {data_end - data_start}: tensors must "
                "cover the data section in order, without overlap or gap."
            )
        data_end = e.end
    if data_end != size:
        what = "truncated" if data_end > size else "longer than its header describes"
        raise ShardFileError(
            f"{path} is {what}: its header describes {data_end} bytes, the file has {size}."
        )
    return FileHeader(path, data_start, size, tuple(entries))


def copy_out(
    src: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], box: Box, dst: torch.Tensor
) -> None:
    """``dst.copy_(box of the tensor of dtype and shape whose bytes src holds)``."""
    src = src.view(dtype).view(shape)
    for dim, (a, b) in enumerate(box):
        src = src.narrow(dim, a, b - a)
    dst.copy_(src)
