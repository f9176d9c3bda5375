"""Rewrite a sharded-state checkpoint saved at TP=M as the files a save at TP=N writes.

Tensor by tensor: for each new rank, each tensor's slice at N is allocated, filled from
the saved files with the resharder's copies (``resharder.fill_resharded``: only the byte
ranges it is made of are read), written, and let go before the next one is made. Peak
memory is then about the largest tensor plus the writer's buffers, not the model.

The output is what ``save_sharded_state`` at N writes: tensors in the order the save
stores them, split into parts the same way, laid out by ``plan_layout``, and a manifest
of the same records (``saver.tensor_schema``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm.model_executor.layers.shard_spec import ShardSpec
from vllm.model_executor.model_loader.safetensors.format import DTYPES, ShardFileError
from vllm.model_executor.model_loader.safetensors.reader import ReadStats, default_num_threads
from vllm.model_executor.model_loader.safetensors.writer import header_json, plan_layout, write_raw
from vllm.model_executor.model_loader.sharded_state.manifest import ManifestFile
from vllm.model_executor.model_loader.sharded_state.resharder import SavedRanks, fill_resharded
from vllm.model_executor.model_loader.sharded_state.saver import (
    RankFiles,
    split_parts,
    tensor_schema,
)

# Bytes of small tensors gathered into one write: the tensors held at once besides the
# one being made.
_CHUNK = 16 << 20


@dataclass(frozen=True)
class SavedTensor:
    """One tensor of the save: its dtype, shape at the saved TP size and how it is split."""

    name: str
    dtype: torch.dtype
    saved_shape: tuple[int, ...]
    spec: ShardSpec

    def shape_at(self, tp_size: int) -> tuple[int, ...]:
        """A rank's shape at ``tp_size`` (every rank holds the same shape)."""
        shape = list(self.saved_shape)
        if self.spec.dim is not None:
            shape[self.spec.dim] = self.spec.local_size(tp_size)
        return tuple(shape)


def check_tp_sizes(tensors: list[SavedTensor], src_tp: int, dst_tp: int) -> None:
    """Fail before anything is written when a tensor cannot be split ``dst_tp`` ways
    (naming the sizes every tensor can take), or when a saved shape is not the one its
    spec gives at ``src_tp`` (the layout is then not the one the spec states)."""
    split = [t for t in tensors if t.spec.dim is not None]
    bad: list[str] = []
    first = ""
    for t in split:
        try:
            t.spec.check_tp(dst_tp)
        except ValueError as e:
            bad.append(t.name)
            first = first or str(e)
    if bad:
        limit = max((s.units for t in split for s in t.spec.segments), default=1)
        works = set(range(1, limit + 1))
        for t in split:
            works &= set(t.spec.working_tp_sizes(limit))
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"Cannot reshard to tensor_parallel_size={dst_tp!r}: {', '.join(bad[:3])}{more} "
            f"cannot be split that way ({first}) This model can take tensor_parallel_size "
            f"{', '.join(map(str, sorted(works)))}."
        )
    for t in split:
        want = t.spec.local_size(src_tp)
        if t.saved_shape[t.spec.dim] != want:
            raise ShardFileError(
                f"{t.name} is saved with shape {list(t.saved_shape)}, but split as "
                f"{t.spec.to_json()} a slice at tensor_parallel_size={src_tp} has {want} rows "
                f"along dim {t.spec.dim}: the checkpoint cannot be resharded. Save it again "
                "from the original model."
            )


def write_resharded(
    tensors: list[SavedTensor],
    source_files: dict[int, list[str]],
    src_tp: int,
    dst_tp: int,
    out_dir: str,
    pattern: str,
    max_size: int | None,
) -> list[RankFiles]:
    """Write every rank's files at ``dst_tp`` into ``out_dir`` (``tensors`` in the order a
    save stores them); returns per rank what it wrote, for ``saver.finish_save``."""
    check_tp_sizes(tensors, src_tp, dst_tp)
    records = []
    stats = ReadStats()
    bar = tqdm(total=len(tensors) * dst_tp, desc="Resharding", unit="tensor")
    with bar, ThreadPoolExecutor(default_num_threads(), thread_name_prefix="reshard") as pool:
        for rank in range(dst_tp):
            saved = SavedRanks(source_files, stats, pool)
            try:
                records.append(
                    _write_rank(
                        tensors, saved, src_tp, rank, dst_tp, out_dir, pattern, max_size, bar
                    )
                )
            except BaseException:
                saved.close()
                raise
            error = saved.close()
            if error is not None:
                raise error
    return records


def _write_rank(
    tensors: list[SavedTensor],
    saved: SavedRanks,
    src_tp: int,
    rank: int,
    dst_tp: int,
    out_dir: str,
    pattern: str,
    max_size: int | None,
    bar: tqdm,
) -> RankFiles:
    """Write rank ``rank``'s files at ``dst_tp``, split into parts as the saver splits."""
    # Shapes and dtypes only: the saver's own part split, layout and schema run on them.
    state = {}
    for t in tensors:
        meta = torch.empty(t.shape_at(dst_tp), dtype=t.dtype, device="meta")
        meta.shard_spec = t.spec
        state[t.name] = meta
    by_name = {t.name: t for t in tensors}
    files = {}
    for part, items in enumerate(split_parts(state, max_size)):
        name = pattern.format(rank=rank, part=part)
        ordered, header, _ = plan_layout(items)
        data = _filled([by_name[n] for n, _ in ordered], saved, src_tp, rank, dst_tp, bar)
        size, crc = write_raw(os.path.join(out_dir, name), header_json(header), data, chunk=_CHUNK)
        files[name] = ManifestFile(rank, part, size, crc, [key for key, _ in items])
    return RankFiles(files, tensor_schema(state, dst_tp))


def _filled(
    tensors: list[SavedTensor], saved: SavedRanks, src_tp: int, rank: int, dst_tp: int, bar: tqdm
) -> Iterator[memoryview]:
    """Each tensor's slice at ``dst_tp`` as bytes, made when the writer asks for it."""
    for t in tensors:
        dst = torch.empty(t.shape_at(dst_tp), dtype=t.dtype)
        after: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            fill_resharded(t.name, dst, t.spec, saved, src_tp, rank, dst_tp, after)
            saved.wait()
            for target, buffer in after:
                target.copy_(buffer)
        del after
        bar.update(1)
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
        del dst
        yield view
        del view  # before the next tensor is made


def saved_tensors_from_headers(
    names: list[str], specs: dict[str, ShardSpec], header: dict[str, dict]
) -> list[SavedTensor]:
    """``SavedTensor``s of ``names`` from a saved rank's safetensors header entries (a
    save without a manifest); a name the files lack is named."""
    out = []
    for name in names:
        entry = header.get(name)
        if entry is None:
            raise ShardFileError(
                f"{name}, which this model holds, is missing from the saved files: they "
                "were saved from another model or version."
            )
        out.append(SavedTensor(name, DTYPES[entry["dtype"]], tuple(entry["shape"]), specs[name]))
    return out
