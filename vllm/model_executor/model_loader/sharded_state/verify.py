"""Check a written sharded-state checkpoint the way a load at its TP size will use it.

Every file listed in the manifest is re-read: its size and CRC-32 must be the recorded
ones. Every rank's files must hold exactly the tensors that rank's model asks for (the
model built on the meta device from the directory's config.json), with their shapes and
dtypes, as the loader's strict check requires.
"""

from __future__ import annotations

import os

import torch
from zlib_ng import zlib_ng

from vllm.config import ModelConfig
from vllm.distributed.parallel_state import tensor_parallel_state
from vllm.model_executor.model_loader.base_loader import initialize_model
from vllm.model_executor.model_loader.safetensors.format import (
    ShardFileError,
    header_specs,
)
from vllm.model_executor.model_loader.sharded_state.manifest import (
    MANIFEST_NAME,
    Manifest,
    read_manifest,
)
from vllm.model_executor.model_loader.state_dict_utils import state_schema
from vllm.model_executor.model_loader.strict import Spec, check_state

_CHUNK = 16 << 20


def file_crc32(path: str) -> int:
    """The CRC-32 of the whole file, read in large chunks."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib_ng.crc32(view[:n], crc)
    return crc


def verify_checkpoint(path: str, expected: dict[int, dict[str, Spec]] | None = None) -> None:
    """Raise ShardFileError naming the first file or tensor that a load would refuse.

    ``expected``: per rank, (shape, dtype) of every tensor its model holds; by default
    built from the directory's config.json on the meta device."""
    manifest = read_manifest(path)
    if manifest is None:
        raise ShardFileError(f"{path} has no {MANIFEST_NAME}: nothing to verify against.")
    tp_size = manifest.tensor_parallel_size or 1
    if expected is None:
        model_config = ModelConfig(
            model=path,
            dtype=getattr(torch, manifest.dtype),
            quantization=manifest.quantization,
            quantization_params=manifest.quantization_config,
            quantized_checkpoint=manifest.quantization is not None,
        )
        expected = {}
        for rank in range(tp_size):
            with tensor_parallel_state(rank, tp_size):
                expected[rank] = state_schema(initialize_model(model_config, torch.device("meta")))
    for rank in range(tp_size):
        verify_rank(path, manifest, rank, expected[rank])


def verify_rank(path: str, manifest: Manifest, rank: int, expected: dict[str, Spec]) -> None:
    """Check rank ``rank``'s files: sizes and CRC-32s as recorded, and the tensors
    ``expected`` (what that rank's model holds) with their shapes and dtypes."""
    written: dict[str, Spec] = {}
    where: dict[str, str] = {}
    for name, info in manifest.rank_files(rank):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ShardFileError(f"{file}, listed in {MANIFEST_NAME}, is missing.")
        size = os.path.getsize(file)
        if size != info.size:
            raise ShardFileError(f"{file} is {size} bytes; {MANIFEST_NAME} records {info.size}.")
        crc = file_crc32(file)
        if crc != info.crc32:
            raise ShardFileError(
                f"{file} has CRC-32 {crc:08x}; {MANIFEST_NAME} records {info.crc32:08x}: the "
                "file is corrupt. Write the checkpoint again."
            )
        specs, _ = header_specs(file)
        written.update(specs)
        where.update(dict.fromkeys(specs, name))
    check_state(
        f"rank {rank}'s files in {path}",
        expected,
        written,
        files=where,
        hint=f"A load at tensor_parallel_size={manifest.tensor_parallel_size} would refuse them.",
        error=ShardFileError,
    )
