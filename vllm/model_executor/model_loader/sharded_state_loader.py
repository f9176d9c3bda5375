"""``load_format="sharded_state"``: every tensor-parallel rank loads only its own files.

A checkpoint directory holds, per rank, files named by ``pattern`` (default
``model-rank-{rank}-part-{part}.safetensors``) with that rank's state dict as the model
holds it after loading, tensors that alias another tensor's memory written once; and a
manifest ``sharded_state.json`` (see ``sharded_state_format``). Directories saved by
upstream vLLM (no manifest) load too. See docs/sharded_state.md.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from vllm.config import LoadConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.logger import init_logger
from vllm.model_executor.model_loader import sharded_state_dir
from vllm.model_executor.model_loader.loader import BaseModelLoader, initialize_model
from vllm.model_executor.model_loader.safetensors_io import (
    FileHeader,
    ShardFileError,
    dtype_name,
    read_header,
    read_into,
)
from vllm.model_executor.model_loader.sharded_state_format import (
    DEFAULT_PATTERN,
    MANIFEST_NAME,
    check_manifest,
    describe_pattern,
    find_rank_files,
    list_some,
    ranks_present,
    read_manifest,
    validate_pattern,
)
from vllm.model_executor.model_loader.sharded_state_saver import save_sharded_state
from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors

__all__ = ["DEFAULT_PATTERN", "MANIFEST_NAME", "ShardedStateLoader"]

logger = init_logger(__name__)

_EXTRA_CONFIG_KEYS = ("pattern", "verify")
_MAX_READER_THREADS = 8


class ShardedStateLoader(BaseModelLoader):
    """Load each rank's slice from its own files; ``save_model`` writes them.

    ``model_loader_extra_config`` keys: ``pattern`` (file name pattern with ``{rank}`` and
    ``{part}``; default: the manifest's, else ``DEFAULT_PATTERN``) and ``verify`` (true:
    check every file's CRC-32 against the manifest; sizes are always checked).
    """

    DEFAULT_PATTERN = DEFAULT_PATTERN

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - set(_EXTRA_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"Unknown model_loader_extra_config key(s) for load_format='sharded_state': "
                f"{', '.join(map(repr, unknown))}. Supported: 'pattern' (file name pattern "
                "with {rank} and {part}) and 'verify' (true: check file checksums)."
            )
        pattern = extra.get("pattern")
        self.pattern: str | None = None if pattern is None else validate_pattern(pattern)
        verify = extra.get("verify", False)
        if not isinstance(verify, bool):
            raise ValueError(
                f"model_loader_extra_config 'verify' must be true or false, got {verify!r}."
            )
        self.verify = verify

    @staticmethod
    def _filter_subtensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream's rule for tensors that share memory; see ``filter_subtensors``."""
        return filter_subtensors(tensors)

    def load_model(self, vllm_config: VllmConfig) -> nn.Module:
        model_config = vllm_config.model_config
        model_dir = model_config.model
        rank = get_tensor_model_parallel_rank()
        files = self._rank_files(vllm_config, model_dir, rank)
        model = initialize_model(model_config, vllm_config.device_config.torch_device)
        start = time.perf_counter()
        with torch.no_grad():
            targets = self._filter_subtensors(model.state_dict())
            headers = [read_header(path) for path, _ in files]
            _check_headers(headers, targets, rank, vllm_config)
            _read_files(headers, targets, dict(files) if self.verify else None)
        logger.info("Loading weights took %.2f seconds", time.perf_counter() - start)
        return model.eval()

    def _rank_files(
        self, vllm_config: VllmConfig, model_dir: str, rank: int
    ) -> list[tuple[str, int | None]]:
        """(path, CRC-32 from the manifest or None) of this rank's files, sizes checked."""
        if not os.path.isdir(model_dir):
            raise ShardFileError(f"{model_dir} is not a directory.")
        if sharded_state_dir.is_incomplete(model_dir):
            raise ShardFileError(
                f"{model_dir} holds an unfinished save_sharded_state (the saving process was "
                "interrupted): run the save again."
            )
        manifest = read_manifest(model_dir)
        if manifest is None:
            logger.warning(
                "%s has no %s (saved by upstream vLLM?): the configuration, file sizes and "
                "checksums cannot be verified.",
                model_dir,
                MANIFEST_NAME,
            )
            pattern = self.pattern or DEFAULT_PATTERN
            paths = find_rank_files(model_dir, pattern, rank)
            if not paths:
                present = ranks_present(model_dir, pattern)
                hint = (
                    f"Files exist for rank(s) {', '.join(present)}: was it saved with a "
                    "different tensor_parallel_size?"
                    if present
                    else "Save it with save_sharded_state first, or pass the pattern it was "
                    "saved with as model_loader_extra_config={'pattern': ...}."
                )
                raise ShardFileError(
                    f"No shard files for rank {rank} in {model_dir}: nothing matches "
                    f"{describe_pattern(pattern, rank)} (pattern {pattern!r}). {hint}"
                )
            return [(path, None) for path in paths]
        check_manifest(manifest, vllm_config, model_dir)
        pattern = manifest.get("pattern")
        if self.pattern is not None and self.pattern != pattern:
            raise ValueError(
                f"model_loader_extra_config pattern {self.pattern!r} differs from the pattern "
                f"{pattern!r} that {model_dir} was saved with (see its {MANIFEST_NAME}); leave "
                "the option out."
            )
        entries = sorted(
            (info["part"], name, info)
            for name, info in manifest["files"].items()
            if info.get("rank") == rank
        )
        if not entries:
            raise ShardFileError(
                f"No shard files for rank {rank} in {model_dir}: its {MANIFEST_NAME} lists "
                f"none for this rank (pattern {pattern!r})."
            )
        files = []
        for _, name, info in entries:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise ShardFileError(
                    f"Shard file {path} is missing (listed in {MANIFEST_NAME}); save the "
                    "checkpoint again."
                )
            size = os.path.getsize(path)
            if size != info["size"]:
                raise ShardFileError(
                    f"{path} is {size} bytes but {MANIFEST_NAME} records {info['size']}: the "
                    "file is truncated or was replaced. Save the checkpoint again."
                )
            files.append((path, int(info["crc32"], 16)))
        return files

    @staticmethod
    def save_model(
        model: nn.Module,
        path: str,
        pattern: str | None = None,
        max_size: int | str | None = None,
        *,
        vllm_config: VllmConfig | None = None,
    ) -> None:
        """Save this rank's slice of ``model`` under ``path``; every rank must call it.

        See ``sharded_state_saver.save_sharded_state``; ``vllm_config`` (the engine's)
        fills the manifest, else it is derived from the model.
        """
        save_sharded_state(model, path, pattern, max_size, vllm_config)


def _check_headers(
    headers: list[FileHeader], targets: dict[str, torch.Tensor], rank: int, vllm_config
) -> None:
    tp = vllm_config.parallel_config.tensor_parallel_size
    seen: dict[str, str] = {}
    unexpected: list[str] = []
    for header in headers:
        for entry in header.tensors:
            if entry.name in seen:
                raise ShardFileError(
                    f"{entry.name} is stored twice: in {seen[entry.name]} and {header.path}."
                )
            seen[entry.name] = header.path
            dst = targets.get(entry.name)
            if dst is None:
                unexpected.append(f"{entry.name} (in {header.path})")
                continue
            if tuple(dst.shape) != entry.shape:
                raise ShardFileError(
                    f"Shape mismatch for {entry.name} in {header.path}: the file holds "
                    f"{list(entry.shape)}, the model expects {list(dst.shape)} at "
                    f"tensor_parallel_size={tp}. Was it saved from another model or "
                    "tensor_parallel_size?"
                )
            if dst.dtype != entry.dtype:
                raise ShardFileError(
                    f"Dtype mismatch for {entry.name} in {header.path}: the file holds "
                    f"{dtype_name(entry.dtype)}, the model uses {dtype_name(dst.dtype)}; load "
                    f"with the dtype the checkpoint was saved with."
                )
    if unexpected:
        raise ShardFileError(
            f"Unexpected keys in the shard files of rank {rank}, which the model does not "
            f"have: {list_some(unexpected)}. Was the checkpoint saved from a different model?"
        )
    missing = [name for name in targets if name not in seen]
    if missing:
        raise ShardFileError(
            f"Missing keys in the shard files of rank {rank} "
            f"({', '.join(h.path for h in headers)}): {list_some(missing)}. Was the checkpoint "
            "saved from a different model, or is a file missing?"
        )


def _read_files(
    headers: list[FileHeader], targets: dict[str, torch.Tensor], crcs: dict[str, Any] | None
) -> None:
    """Read every file into ``targets``, several files at once; check CRC-32s if given."""

    def read_one(header: FileHeader) -> None:
        expected = None if crcs is None else crcs.get(header.path)
        crc = read_into(header, targets, checksum=expected is not None)
        if expected is not None and crc != expected:
            raise ShardFileError(
                f"Checksum mismatch for {header.path}: CRC-32 {crc:08x}, {MANIFEST_NAME} "
                f"records {expected:08x}. The file is corrupt; save the checkpoint again."
            )

    if crcs is not None and all(v is None for v in crcs.values()):
        logger.warning("verify=true, but without %s there are no checksums.", MANIFEST_NAME)
    threads = min(len(headers), _MAX_READER_THREADS)
    if threads <= 1:
        for header in headers:
            read_one(header)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="shard-reader") as pool:
        for future in [pool.submit(read_one, h) for h in headers]:
            future.result()
