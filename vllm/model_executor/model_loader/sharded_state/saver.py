"""``save_sharded_state``: every tensor-parallel rank writes its own slice of the model.

Ranks write into one temporary directory beside the target; each checks that its files
hold exactly what a sharded-state load will ask for; rank 0 then writes the manifest and
swaps the directory into place (``directory``). Ranks agree on every step through
``all_gather_object``, so a failure on one rank is raised on all of them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.shard_spec import get_shard_spec
from vllm.model_executor.model_loader.base_loader import initialize_model, set_default_torch_dtype
from vllm.model_executor.model_loader.safetensors.format import (
    ShardFileError,
    dtype_name,
    header_specs,
    read_header_bytes,
)
from vllm.model_executor.model_loader.safetensors.writer import write_file
from vllm.model_executor.model_loader.sharded_state import directory
from vllm.model_executor.model_loader.sharded_state.manifest import (
    DEFAULT_PATTERN,
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    ManifestTensor,
    engine_config_info,
    pattern_regex,
    read_manifest,
    validate_pattern,
)
from vllm.model_executor.model_loader.sharded_state.verify import verify_rank
from vllm.model_executor.model_loader.sharded_state.weight_region import (
    WeightRegion,
    get_region,
)
from vllm.model_executor.model_loader.state_dict_utils import (
    INITIAL_STATE_ATTR,
    filter_subtensors,
    state_schema,
)
from vllm.model_executor.model_loader.strict import Spec, check_state
from vllm.utils import gc_paused

logger = init_logger(__name__)


class RankFiles(NamedTuple):
    """What one rank wrote, gathered by rank 0 for the manifest."""

    files: dict[str, ManifestFile]
    tensors: dict[str, ManifestTensor]


# Ranks wait for each other between the steps of a save: for the slowest rank's writes,
# and for rank 0's swap. Those can take far longer than a collective of the forward pass
# (VLLM_DIST_TIMEOUT_S), so the save agrees over its own gloo group with this timeout.
_SAVE_TIMEOUT = timedelta(hours=6)


def save_sharded_state(
    model: nn.Module,
    path: str,
    pattern: str | None = None,
    max_size: int | str | None = None,
    vllm_config: VllmConfig | None = None,
    verify: bool = False,
) -> None:
    """Save this rank's state dict under ``path``; every rank of the group must call it.

    Files are written into a temporary directory beside ``path``, checked against what
    the loader will ask for, and swapped into place with the manifest; files already
    in ``path`` that are not sharded state (config, tokenizer) are kept. ``max_size``
    (bytes) splits a rank's tensors into several files; a tensor larger than it gets
    a file of its own. ``verify``: each rank then re-reads its files (CRC-32s against the
    manifest, tensors against what a load asks for, ``verify.verify_rank``).
    """
    pattern = validate_pattern(DEFAULT_PATTERN if pattern is None else pattern)
    max_size = parse_max_size(max_size)
    rank = get_tensor_model_parallel_rank()
    world = get_tensor_model_parallel_world_size()
    target = os.path.realpath(path)
    start = time.perf_counter()
    with gc_paused(), _save_group(world) as group:
        tmp = _on_rank0(lambda: directory.make_temp_dir(target), rank, group)
        try:
            records = _on_every_rank(
                lambda: save_rank_files(model, tmp, pattern, max_size, rank, world, vllm_config),
                rank,
                group,
            )
            old = _on_rank0(
                lambda: finish_save(
                    target, tmp, pattern, records, manifest_info(model, world, vllm_config)
                ),
                rank,
                group,
            )
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:  # the replaced checkpoint: each rank deletes a share of it
            old_dir, shares = old
            _on_every_rank(lambda: directory.delete_files(shares[rank]), rank, group)
            if rank == 0:
                shutil.rmtree(old_dir, ignore_errors=True)
        if verify:
            _on_every_rank(
                lambda: verify_rank(
                    target, read_manifest(target), rank, expected_state(model, vllm_config)
                ),
                rank,
                group,
            )
    if rank == 0:
        nbytes = sum(i.size for r in records for i in r.files.values())
        logger.info(
            "Saved the sharded state of %d rank(s) to %s: %d files, %.1f MiB in %.2f s",
            world,
            target,
            sum(len(r.files) for r in records),
            nbytes / (1 << 20),
            time.perf_counter() - start,
        )


def parse_max_size(max_size: int | str | None) -> int | None:
    """``max_size`` in bytes (None: no limit); raises naming a value that is not one."""
    if max_size is None:
        return None
    try:
        value = int(max_size)  # upstream's example passes --max-file-size as a string
    except (TypeError, ValueError):
        raise ValueError(f"max_size must be a number of bytes, got {max_size!r}.") from None
    if value < 1:
        raise ValueError(f"max_size must be at least 1 byte, got {value}.")
    return value


@contextmanager
def _save_group(world: int) -> Iterator[Any]:
    """A gloo group of all ranks for the save's agreements (None in a single process)."""
    if world == 1 or not dist.is_initialized():
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=_SAVE_TIMEOUT)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def _gather(obj: Any, group: Any) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _on_every_rank(fn: Callable[[], Any], rank: int, group: Any) -> list[Any]:
    """Run ``fn`` on every rank; all ranks get every result, or all raise if one failed."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as e:
        error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    outcomes = _gather((result, message), group)
    if error is not None:
        raise error
    for r, (_, message) in enumerate(outcomes):
        if message is not None:
            raise RuntimeError(f"save_sharded_state failed on rank {r}: {message}")
    return [res for res, _ in outcomes]


def _on_rank0(fn: Callable[[], Any], rank: int, group: Any) -> Any:
    return _on_every_rank(fn if rank == 0 else (lambda: None), rank, group)[0]


def split_parts(
    state: dict[str, torch.Tensor], max_size: int | None
) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``max_size`` bytes; an oversized tensor stands alone."""
    parts: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and max_size is not None and size + nbytes > max_size:
            parts.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        parts.append(current)
    return parts


def tensor_schema(state: dict[str, torch.Tensor], world: int) -> dict[str, ManifestTensor]:
    """Per tensor of ``state`` (the parameters and buffers themselves): dtype, local shape,
    and from its ``shard_spec`` (stated by its layer) the shard dim, the global shape (the
    tensor at TP=1, without vocabulary padding) and the spec itself."""
    schema = {}
    for name, t in state.items():
        spec = get_shard_spec(t)
        local = list(t.shape)
        global_shape = list(local)
        if spec.dim is not None:
            global_shape[spec.dim] = spec.global_size
        schema[name] = ManifestTensor(
            dtype_name(t.dtype), local, global_shape, spec.dim, shard_spec=spec.to_json()
        )
    return schema


def expected_state(model: nn.Module, vllm_config: VllmConfig | None) -> dict[str, tuple]:
    """(shape, dtype) of every tensor a sharded-state load will ask for: what the model
    held when it was built (recorded by ``initialize_model``), else what a rebuild on the
    meta device holds."""
    model_config = vllm_config.model_config if vllm_config is not None else None
    quant_config = model_config.quant_config if model_config is not None else None
    # Weights quantized after loading are saved quantized: a load builds the model so.
    quantized_after_load = quant_config is not None and not quant_config.checkpoint_is_quantized
    recorded = getattr(model, INITIAL_STATE_ATTR, None)
    if recorded is not None and not quantized_after_load:
        return recorded
    try:
        meta = torch.device("meta")
        if model_config is not None:
            if quantized_after_load:
                model_config = model_config.as_quantized_checkpoint()
            fresh = initialize_model(model_config, meta)
        else:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            with set_default_torch_dtype(dtype or torch.get_default_dtype()), meta:
                fresh = type(model)(model.config)
    except Exception as e:  # a model that cannot be built on meta: compare with itself
        logger.warning("Could not rebuild %s on the meta device (%s).", type(model).__name__, e)
        fresh = model
    return state_schema(fresh)


def save_rank_files(
    model: nn.Module,
    tmp: str,
    pattern: str,
    max_size: int | None,
    rank: int,
    world: int,
    vllm_config: VllmConfig | None,
) -> RankFiles:
    """Write this rank's files into ``tmp`` and check they hold what loading asks for."""
    region = get_region(model)
    if region is not None and region.intact():
        state = region.state()  # what the model was built with, laid out as the file
        if max_size is None or region.nbytes <= max_size:
            # One file, the region's memory in one piece, mappable over it when loading.
            name = pattern.format(rank=rank, part=0)
            size, crc = region.write(os.path.join(tmp, name))
            files = {name: ManifestFile(rank, 0, size, crc, list(state))}
            _check_region_file(region, os.path.join(tmp, name), size)
            return RankFiles(files, tensor_schema(state, world))
    else:
        # Weights packed for the CPU (mkldnn) stay packed here: write_file turns each back
        # into a plain tensor just before writing it, so no dense copy is held.
        state = filter_subtensors(model.state_dict(keep_vars=True))
    files = {}
    for part, items in enumerate(split_parts(state, max_size)):
        name = pattern.format(rank=rank, part=part)
        size, crc = write_file(os.path.join(tmp, name), items)
        files[name] = ManifestFile(rank, part, size, crc, [key for key, _ in items])
    check_loadable(expected_state(model, vllm_config), tmp, files, rank)
    return RankFiles(files, tensor_schema(state, world))


def _check_region_file(region: WeightRegion, path: str, size: int) -> None:
    """Fail unless the file written from ``region`` reads back as its layout. The region
    holds exactly the tensors the model was built with, which loading asks for."""
    raw, data_start, on_disk = read_header_bytes(path)
    if on_disk != size or not region.matches(raw, data_start, on_disk):
        raise ShardFileError(
            f"{path} does not read back as written ({on_disk} bytes on disk, {size} written)."
        )


def check_loadable(expected: dict[str, tuple], tmp: str, files: dict, rank: int) -> None:
    """Fail unless the written files hold exactly the tensors loading will ask for."""
    written: dict[str, Spec] = {}
    where: dict[str, str] = {}
    for name, info in files.items():
        path = os.path.join(tmp, name)
        specs, size = header_specs(path)
        if size != info.size:
            raise ShardFileError(f"{path} is {size} bytes, {info.size} written.")
        written.update(specs)
        where.update(dict.fromkeys(specs, name))
    check_state(
        f"rank {rank}'s files",
        expected,
        written,
        files=where,
        prefix="save_sharded_state stopped before writing a checkpoint that would not load: ",
        hint="Something changed the model's state dict after loading (e.g. weights repacked "
        "for a backend). The target directory was left unchanged.",
        error=RuntimeError,
    )


def manifest_info(model: nn.Module, world: int, vllm_config: VllmConfig | None) -> dict[str, Any]:
    """The manifest's configuration fields: the engine's, else derived from the model."""
    if vllm_config is not None:
        return engine_config_info(vllm_config)
    archs = getattr(getattr(model, "config", None), "architectures", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {
        "architecture": (archs or [type(model).__name__])[0],
        "tensor_parallel_size": world,
        "pipeline_parallel_size": 1,
        "dtype": dtype_name(dtype or torch.get_default_dtype()),
        "quantization": None,
        "quantization_config": None,
    }


def finish_save(
    target: str, tmp: str, pattern: str, records: list[RankFiles], config: dict[str, Any]
) -> tuple[str, list[list[str]]] | None:
    """Rank 0: write the manifest, then put the directory in place keeping the target's
    files that are not sharded state (``config``: the manifest's configuration fields,
    ``manifest_info``). Returns the directory holding the replaced files
    and their split into one share per rank, for the ranks to delete; or None."""
    files: dict[str, ManifestFile] = {}
    for record in records:
        for name, info in record.files.items():
            if name in files:
                raise ValueError(f"The pattern {pattern!r} gives two ranks the file {name}.")
            files[name] = info
    tensors: dict[str, ManifestTensor] = records[0].tensors
    for r, record in enumerate(records):
        if record.tensors.keys() != tensors.keys():
            raise RuntimeError(f"Rank {r} holds different tensors than rank 0.")
    for name, entry in tensors.items():
        shapes = [record.tensors[name].local_shape for record in records]
        if any(s != shapes[0] for s in shapes):
            entry.local_shapes = shapes  # per rank, where ranks hold different sizes

    old = None
    try:
        old = read_manifest(target) if os.path.isdir(target) else None
    except ShardFileError:
        pass
    old_files = set(old.files) if old is not None else set()
    regexes = [pattern_regex(pattern), pattern_regex(DEFAULT_PATTERN)]
    if old is not None:
        regexes.append(pattern_regex(old.pattern))

    def is_shard_state(name: str) -> bool:
        return name == MANIFEST_NAME or name in old_files or any(r.match(name) for r in regexes)

    manifest = Manifest(
        **config,
        pattern=pattern,
        files=dict(sorted(files.items(), key=lambda kv: (kv[1].rank, kv[1].part))),
        tensors=tensors,
    )
    manifest_path = os.path.join(tmp, MANIFEST_NAME)
    with open(manifest_path, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    old_dir = directory.install(tmp, target, is_shard_state, last=MANIFEST_NAME)
    if old_dir is None:
        return None
    return old_dir, directory.split_for_deletion(old_dir, len(records))
