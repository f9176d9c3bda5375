"""``load_format="sharded_state"``: every tensor-parallel rank loads only its own files.

A checkpoint directory holds, per rank, files named by ``pattern`` (default
``model-rank-{rank}-part-{part}.safetensors``) with that rank's state dict as the model
holds it after loading, tensors that alias another tensor's memory written once; and a
manifest ``sharded_state.json`` (``manifest.Manifest``). Directories saved by
upstream vLLM (no manifest) load too. See docs/sharded_state.md.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from vllm.config import LoadConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.shard_spec import get_shard_spec
from vllm.model_executor.model_loader.base_loader import BaseModelLoader, repacks_weights
from vllm.model_executor.model_loader.safetensors.format import (
    FileHeader,
    ShardFileError,
    TensorEntry,
    read_header,
    read_header_bytes,
)
from vllm.model_executor.model_loader.safetensors.mapping import map_file
from vllm.model_executor.model_loader.safetensors.reader import ReadStats, read_tensors
from vllm.model_executor.model_loader.sharded_state import directory
from vllm.model_executor.model_loader.sharded_state.manifest import (
    DEFAULT_PATTERN,
    MANIFEST_NAME,
    Manifest,
    describe_pattern,
    find_rank_files,
    ranks_present,
    read_manifest,
    validate_pattern,
)
from vllm.model_executor.model_loader.sharded_state.resharder import read_resharded
from vllm.model_executor.model_loader.sharded_state.saver import save_sharded_state
from vllm.model_executor.model_loader.sharded_state.weight_region import (
    WeightRegion,
    get_region,
)
from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors, storage_id
from vllm.model_executor.model_loader.strict import Spec, check_state
from vllm.utils import gc_paused

__all__ = ["DEFAULT_PATTERN", "MANIFEST_NAME", "ShardedStateLoader"]

logger = init_logger(__name__)

_EXTRA_CONFIG_KEYS = ("pattern", "verify", "mmap")


class ShardedStateLoader(BaseModelLoader):
    """Load each rank's slice from its own files; ``save_model`` writes them.

    ``model_loader_extra_config`` keys: ``pattern`` (file name pattern with ``{rank}`` and
    ``{part}``; default: the manifest's, else ``DEFAULT_PATTERN``), ``verify`` (true:
    check every file's CRC-32 against the manifest; sizes are always checked) and
    ``mmap`` (true: on the CPU, parameters map the files' pages instead of copies of
    them; default: true on the CPU unless the weights are repacked after loading, and
    never with ``verify``).
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
                "with {rank} and {part}), 'verify' (true: check file checksums) and 'mmap' "
                "(true/false: map the files instead of reading them, CPU only)."
            )
        pattern = extra.get("pattern")
        self.pattern: str | None = None if pattern is None else validate_pattern(pattern)
        verify = extra.get("verify", False)
        if not isinstance(verify, bool):
            raise ValueError(
                f"model_loader_extra_config 'verify' must be true or false, got {verify!r}."
            )
        self.verify = verify
        use_mmap = extra.get("mmap")
        if use_mmap is not None and not isinstance(use_mmap, bool):
            raise ValueError(
                f"model_loader_extra_config 'mmap' must be true or false, got {use_mmap!r}."
            )
        if use_mmap and verify:
            raise ValueError(
                "model_loader_extra_config 'mmap' and 'verify' exclude each other: checking "
                "checksums reads the files. Leave one out."
            )
        self.mmap: bool | None = use_mmap

    @staticmethod
    def _filter_subtensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream's rule for tensors that share memory; see ``filter_subtensors``."""
        return filter_subtensors(tensors)

    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> None:
        """Fill ``model`` from this rank's files. A file laid out as the model's weight
        block (``weight_region``) is mapped over it, or read into it, in one piece;
        otherwise headers are checked against the model first (``check_state``, before
        any byte lands in a parameter: hence None, nothing left to check), then the
        files mapped tensor by tensor or read with several threads straight into the
        parameters."""
        # Objects made per tensor (headers, views, dicts) trigger full collections, each
        # walking the whole model: with them paused a checkpoint of many tensors maps in
        # about half the time.
        with gc_paused():
            self._load_weights(model, vllm_config)

    def _load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> None:
        start = time.perf_counter()
        rank = get_tensor_model_parallel_rank()
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        model_dir = vllm_config.model_config.model
        manifest, pattern, saved_tp = self._saved_layout(vllm_config, model_dir)
        if saved_tp != tp_size:
            self._load_resharded(model, model_dir, manifest, pattern, saved_tp, start)
            return
        files = self._rank_files(model_dir, manifest, pattern, rank)
        crcs = [crc for _, crc in files] if self.verify else None
        if crcs is not None and all(crc is None for crc in crcs):
            logger.warning("verify=true, but without %s there are no checksums.", MANIFEST_NAME)
        use_mmap = self._use_mmap(vllm_config, model)
        region = get_region(model)
        in_block = region is not None and region.intact()  # the model's state is its block
        if in_block and len(files) == 1:
            nbytes = _load_block(region, files[0][0], crcs[0] if crcs else None, use_mmap)
            if nbytes is not None:
                self.report_weights_loaded(start, nbytes)
                return
        state = model.state_dict(keep_vars=True)  # the parameters and buffers themselves
        # In the block: the same tensors, without sorting out shared memory.
        targets = region.state() if in_block else self._filter_subtensors(state)
        headers = [read_header(path) for path, _ in files]
        _check_headers(headers, targets, rank, vllm_config)
        nbytes = sum(h.data_start for h in headers)
        with torch.no_grad():
            if use_mmap:
                nbytes += _map_files(headers, targets, state, in_block)
            nbytes += read_tensors(headers, targets, crcs)
        self.report_weights_loaded(start, nbytes)

    def _load_resharded(
        self,
        model: nn.Module,
        model_dir: str,
        manifest: Manifest | None,
        pattern: str,
        saved_tp: int,
        start: float,
    ) -> None:
        """Fill ``model`` from a save at another TP size: each saved tensor's layout is
        the model's own ``shard_spec``, checked against the saved shapes; only the rows
        and column ranges of this rank's slices are read (``resharder``)."""
        rank = get_tensor_model_parallel_rank()
        tp_size = get_tensor_model_parallel_world_size()
        logger.info(
            "Resharding %s from tensor_parallel_size=%d to %d (rank %d reads its slices).",
            model_dir,
            saved_tp,
            tp_size,
            rank,
        )
        if self.verify:
            logger.warning(
                "verify=true: checksums cover whole files, which a resharded load does not "
                "read; only file sizes are checked."
            )
        sources = {
            s: [path for path, _ in self._rank_files(model_dir, manifest, pattern, s)]
            for s in range(saved_tp)
        }
        region = get_region(model)
        if region is not None and region.intact():
            targets = region.state()
        else:
            targets = self._filter_subtensors(model.state_dict(keep_vars=True))
        if manifest is not None:
            _check_saved_specs(manifest, targets, model_dir)
        stats = ReadStats()
        with torch.no_grad():
            read_resharded(targets, sources, saved_tp, rank, tp_size, stats)
        self.report_weights_loaded(start, stats.bytes_read)

    def _use_mmap(self, vllm_config: VllmConfig, model: nn.Module) -> bool:
        if vllm_config.device_config.torch_device.type != "cpu" or self.verify:
            return False
        if self.mmap is not None:
            return self.mmap
        # Weights repacked after loading would keep the mapped pages alive next to
        # their packed copies: read those instead.
        return not repacks_weights(model)

    def _saved_layout(
        self, vllm_config: VllmConfig, model_dir: str
    ) -> tuple[Manifest | None, str, int]:
        """(manifest or None, file pattern, TP size saved at) of the checkpoint; without a
        manifest the TP size is the number of ranks with files (0 .. M-1), else taken to
        be the engine's, whose missing files ``_rank_files`` then names."""
        if not os.path.isdir(model_dir):
            raise ShardFileError(f"{model_dir} is not a directory.")
        if directory.is_incomplete(model_dir):
            raise ShardFileError(
                f"{model_dir} holds an unfinished save_sharded_state (the saving process was "
                "interrupted): run the save again."
            )
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        manifest = read_manifest(model_dir)
        if manifest is None:
            logger.warning(
                "%s has no %s (saved by upstream vLLM?): the configuration, file sizes and "
                "checksums cannot be verified.",
                model_dir,
                MANIFEST_NAME,
            )
            pattern = self.pattern or DEFAULT_PATTERN
            present = ranks_present(model_dir, pattern)
            if present and present == [str(r) for r in range(len(present))]:
                return None, pattern, len(present)
            return None, pattern, tp_size
        manifest.check(vllm_config, model_dir)
        if self.pattern is not None and self.pattern != manifest.pattern:
            raise ValueError(
                f"model_loader_extra_config pattern {self.pattern!r} differs from the pattern "
                f"{manifest.pattern!r} that {model_dir} was saved with (see its "
                f"{MANIFEST_NAME}); leave the option out."
            )
        return manifest, manifest.pattern, manifest.tensor_parallel_size or tp_size

    def _rank_files(
        self, model_dir: str, manifest: Manifest | None, pattern: str, rank: int
    ) -> list[tuple[str, int | None]]:
        """(path, CRC-32 from the manifest or None) of saved ``rank``'s files, sizes
        checked."""
        if manifest is None:
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
        entries = manifest.rank_files(rank)
        if not entries:
            raise ShardFileError(
                f"No shard files for rank {rank} in {model_dir}: its {MANIFEST_NAME} lists "
                f"none for this rank (pattern {pattern!r}; saved at tensor_parallel_size="
                f"{manifest.tensor_parallel_size})."
            )
        files = []
        for name, info in entries:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise ShardFileError(
                    f"Shard file {path} is missing (listed in {MANIFEST_NAME}); save the "
                    "checkpoint again."
                )
            size = os.path.getsize(path)
            if size != info.size:
                raise ShardFileError(
                    f"{path} is {size} bytes but {MANIFEST_NAME} records {info.size}: the "
                    "file is truncated or was replaced. Save the checkpoint again."
                )
            files.append((path, info.crc32))
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

        See ``saver.save_sharded_state``; ``vllm_config`` (the engine's)
        fills the manifest, else it is derived from the model; its
        ``model_loader_extra_config`` ``{"verify": true}`` re-reads the files written.
        """
        extra = (vllm_config.load_config.model_loader_extra_config or {}) if vllm_config else {}
        verify = extra.get("verify", False) is True
        save_sharded_state(model, path, pattern, max_size, vllm_config, verify=verify)


def _load_block(region: WeightRegion, path: str, crc: int | None, use_mmap: bool) -> int | None:
    """Load a file laid out as the block of a model whose state is that block (saved by
    this build from a model of the same layout) in one piece, with no work per tensor:
    mapped over the block, or read into it (checking ``crc`` if given). Returns the bytes
    loaded, or None (and does nothing) for a file of another layout."""
    raw_header, data_start, size = read_header_bytes(path)
    if not region.matches(raw_header, data_start, size):
        return None
    with torch.no_grad():
        if use_mmap:
            region.map_file(path, data_start)
            return size
        data = TensorEntry("<weights>", torch.uint8, (region.nbytes,), data_start, size)
        header = FileHeader(path, data_start, size, (data,))
        block = {data.name: region.base[: region.nbytes]}
        return data_start + read_tensors([header], block, [crc])


def _check_headers(
    headers: list[FileHeader], targets: dict[str, torch.Tensor], rank: int, vllm_config
) -> None:
    """Refuse files that do not hold exactly ``targets``, shapes and dtypes included."""
    found: dict[str, Spec] = {}
    where: dict[str, str] = {}
    for header in headers:
        for entry in header.tensors:
            if entry.name in where:
                raise ShardFileError(
                    f"{entry.name} is stored twice: in {where[entry.name]} and {header.path}."
                )
            where[entry.name] = header.path
            found[entry.name] = (entry.shape, entry.dtype)
    expected = {name: (t.shape, t.dtype) for name, t in targets.items()}
    tp = vllm_config.parallel_config.tensor_parallel_size
    check_state(
        f"the shard files of rank {rank} ({', '.join(h.path for h in headers)})",
        expected,
        found,
        files=where,
        hint=f"Was the checkpoint saved from a different model, tensor_parallel_size (the "
        f"engine runs {tp}) or dtype, or is a file missing?",
        error=ShardFileError,
    )


def _map_files(
    headers: list[FileHeader],
    targets: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    in_block: bool,
) -> int:
    """Point every CPU tensor of ``targets`` that owns its memory alone at the mapped file
    (``map_file``) and drop it from ``targets``; returns the bytes mapped. The rest (a
    tensor another one aliases, a misaligned one) stays in ``targets`` to be read.
    ``in_block``: the state is the model's weight block, whose tensors share its storage
    but not a byte, so each may move alone."""
    shared: set[int] = set()
    if not in_block:
        owners: dict[tuple, set[int]] = {}
        for t in state.values():
            if not t.is_mkldnn:
                owners.setdefault(storage_id(t), set()).add(id(t))
        shared = {i for ids in owners.values() if len(ids) > 1 for i in ids}
    nbytes = 0
    for header in headers:
        for name, mapped in map_file(header).items():
            t = targets[name]
            if id(t) in shared or t.device.type != "cpu" or not t.is_contiguous():
                continue
            t.data = mapped
            del targets[name]
            nbytes += mapped.nbytes
    return nbytes


def _check_saved_specs(
    manifest: Manifest, targets: dict[str, torch.Tensor], model_dir: str
) -> None:
    """Refuse to reshard a tensor whose recorded layout is not the model's own."""
    for name, t in targets.items():
        saved = manifest.tensors.get(name)
        if saved is None or saved.shard_spec is None:
            continue  # an older manifest: the saved shapes are checked while reading
        spec = get_shard_spec(t)
        if saved.shard_spec != spec.to_json():
            why = ""
            if manifest.quantization is not None and name.endswith("weight_scale"):
                why = (
                    f" Its {manifest.quantization} scale groups, each within one rank's "
                    "columns, do not line up with this tensor_parallel_size's."
                )
            raise ShardFileError(
                f"{name} was saved split as {saved.shard_spec} (see {model_dir}/"
                f"{MANIFEST_NAME}), but this model splits it as {spec.to_json()}: it cannot "
                f"be resharded.{why} Load it at the tensor_parallel_size it was saved with."
            )
