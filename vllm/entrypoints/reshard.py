"""``vllm reshard``: write a checkpoint as the sharded-state files a save at TP=N writes,
without an engine and without a GPU.

From a sharded-state directory (saved at any TP size, with or without the manifest),
tensor by tensor (``reshard_files``); from a Hugging Face directory, one rank's model at
a time, saved by the saver's own functions. Either way the output is swapped into place
atomically with its manifest, and loads with
``LLM(model=OUTPUT, load_format="sharded_state", tensor_parallel_size=N)``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch

from vllm.config import ModelConfig
from vllm.distributed.parallel_state import tensor_parallel_state
from vllm.logger import init_logger
from vllm.model_executor.layers.cpu_linear import onednn_packing_enabled
from vllm.model_executor.layers.shard_spec import ShardSpec, get_shard_spec
from vllm.model_executor.model_loader.base_loader import initialize_model
from vllm.model_executor.model_loader.safetensors.format import ShardFileError, read_header_json
from vllm.model_executor.model_loader.safetensors.writer import plan_layout
from vllm.model_executor.model_loader.sharded_state import directory
from vllm.model_executor.model_loader.sharded_state.manifest import (
    DEFAULT_PATTERN,
    MANIFEST_NAME,
    Manifest,
    find_rank_files,
    ranks_present,
    read_manifest,
    validate_pattern,
)
from vllm.model_executor.model_loader.sharded_state.reshard_files import (
    SavedTensor,
    check_tp_sizes,
    saved_tensors_from_headers,
    write_resharded,
)
from vllm.model_executor.model_loader.sharded_state.saver import (
    RankFiles,
    finish_save,
    parse_max_size,
)
from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors

logger = init_logger(__name__)

# Writes every rank's files into a directory; returns them and the manifest's fields.
Writer = Callable[[str], tuple[list[RankFiles], dict[str, Any]]]

DESCRIPTION = """\
Write the sharded-state checkpoint that N tensor-parallel workers would save
(load it with LLM(model=OUTPUT, load_format="sharded_state", tensor_parallel_size=N)),
without building the engine and without a GPU.

--input is either
  * a sharded-state directory saved at any tensor_parallel_size M (with this build's
    sharded_state.json, or upstream vLLM's files without one: M is then the number of
    ranks with files, and the layout comes from the model built from its config.json on
    the meta device). Tensors are streamed one at a time: each new rank's slice is
    read from only the byte ranges it is made of, written, and freed, so memory stays
    near the largest tensor plus I/O buffers, not the model.
  * a Hugging Face model directory (config.json + *.safetensors): each rank's model is
    built on the CPU and filled with its own slices, then saved; memory is then about
    one rank's model (the model's size / N) at a time.
Config, tokenizer and generation-config files are copied. The output is written into a
temporary directory beside it and swapped into place with its manifest (file sizes,
CRC-32s, every tensor's shard spec); it may not be inside --input, nor hold it.
"""


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--input", "-i", required=True, help="Checkpoint directory to read.")
    parser.add_argument("--output", "-o", required=True, help="Directory to write.")
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        required=True,
        help="N: the tensor_parallel_size the output is loaded with.",
    )
    parser.add_argument(
        "--max-file-size",
        type=int,
        default=None,
        help="Largest shard file in bytes; a rank's tensors are split into parts below it "
        "(default: one file per rank).",
    )
    parser.add_argument(
        "--file-pattern",
        default=None,
        help="File name pattern of the output, with {rank} and {part} (default: the "
        f"input's, else {DEFAULT_PATTERN!r}).",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="dtype of the output from a Hugging Face checkpoint (as the engine's --dtype; "
        "a sharded input keeps its own).",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Re-read the output: every file's CRC-32 against the manifest, and every "
        "tensor a load at N asks for present with its shape and dtype.",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Run ``reshard``; a user's error (a bad size, path or file) ends the command with
    its message alone, not a traceback."""
    try:
        reshard(
            args.input,
            args.output,
            args.tensor_parallel_size,
            max_size=args.max_file_size,
            pattern=args.file_pattern,
            dtype=args.dtype,
            verify=args.verify,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"vllm reshard: error: {e}")


def reshard(
    input_dir: str,
    output: str,
    tp_size: int,
    max_size: int | None = None,
    pattern: str | None = None,
    dtype: str = "auto",
    verify: bool = False,
) -> None:
    """Write ``input_dir`` as the sharded state of ``tp_size`` ranks into ``output``."""
    source, target = _check_paths(input_dir, output)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"--tensor-parallel-size {tp_size!r}: use a positive int.")
    if pattern is not None:
        validate_pattern(pattern)
    max_size = parse_max_size(max_size)
    manifest = read_manifest(source)
    in_pattern = manifest.pattern if manifest is not None else DEFAULT_PATTERN
    out_pattern = pattern or in_pattern
    present = ranks_present(source, in_pattern)
    if manifest is None and not present:
        write = _hf_writer(source, tp_size, out_pattern, max_size, dtype)
    else:
        write = _sharded_writer(source, manifest, present, tp_size, out_pattern, max_size)
    tmp = directory.make_temp_dir(target)
    try:
        records, info = write(tmp)
        _copy_metadata(source, tmp)
        old = finish_save(target, tmp, out_pattern, records, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        old_dir, shares = old
        for share in shares:
            directory.delete_files(share)
        shutil.rmtree(old_dir, ignore_errors=True)
    logger.info("Wrote %s at tensor_parallel_size=%d.", target, tp_size)
    if verify:
        from vllm.model_executor.model_loader.sharded_state.verify import verify_checkpoint

        verify_checkpoint(target)


def _check_paths(input_dir: str, output: str) -> tuple[str, str]:
    source, target = os.path.realpath(input_dir), os.path.realpath(output)
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"--input {input_dir} is not a directory: give a sharded-state or Hugging Face "
            "model directory."
        )
    if directory.is_incomplete(source):
        raise ShardFileError(
            f"--input {input_dir} holds an unfinished save (the saving process was "
            "interrupted): save it again first."
        )
    for inner, outer in ((target, source), (source, target)):
        if inner == outer or inner.startswith(outer + os.sep):
            raise ValueError(
                f"--output {output} and --input {input_dir} overlap (one is inside the other, "
                "and the output replaces its directory): write to a directory beside the input."
            )
    directory.check_target(target)
    return source, target


def _copy_metadata(source: str, tmp: str) -> None:
    from vllm.entrypoints.save_sharded_state import copy_metadata_files

    copy_metadata_files(source, tmp)


def _model_config(source: str, dtype: str | torch.dtype) -> ModelConfig:
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"{source} has no config.json, which is needed to build the model's layout: "
            "copy the model's config (and tokenizer) files into it."
        )
    return ModelConfig(model=source, dtype=dtype)


def _meta_state(model_config: ModelConfig, rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The distinct state tensors of rank ``rank``'s model at ``tp_size``, on meta."""
    with tensor_parallel_state(rank, tp_size):
        model = initialize_model(model_config, torch.device("meta"))
    return filter_subtensors(model.state_dict(keep_vars=True))


def _sharded_writer(
    source: str,
    manifest: Manifest | None,
    present: list[str],
    tp_size: int,
    pattern: str,
    max_size: int | None,
) -> Writer:
    """The writer for a sharded-state input; all checks are done before it is returned."""
    if manifest is not None:
        if manifest.pipeline_parallel_size not in (None, 1):
            raise ValueError(
                f"{source} was saved with pipeline_parallel_size="
                f"{manifest.pipeline_parallel_size}; vllm reshard handles tensor "
                "parallelism only (pipeline_parallel_size=1)."
            )
        src_tp = manifest.tensor_parallel_size or len(present)
        files = {r: [n for n, _ in manifest.rank_files(r)] for r in range(src_tp)}
        for r, names in files.items():
            missing = [n for n in names if not os.path.isfile(os.path.join(source, n))]
            if not names or missing:
                raise ShardFileError(
                    f"{source} lacks shard files of saved rank {r} listed in its "
                    f"{MANIFEST_NAME}: {', '.join(missing) or 'none are listed'}."
                )
        sources = {r: [os.path.join(source, n) for n in names] for r, names in files.items()}
        info = {
            "architecture": manifest.architecture,
            "tensor_parallel_size": tp_size,
            "pipeline_parallel_size": manifest.pipeline_parallel_size,
            "dtype": manifest.dtype,
            "quantization": manifest.quantization,
            "quantization_config": manifest.quantization_config,
        }
        tensors = [
            SavedTensor(
                name,
                getattr(torch, t.dtype),
                tuple(t.local_shape),
                ShardSpec.from_json(t.shard_spec),
            )
            for name, t in manifest.tensors.items()
            if t.shard_spec is not None
        ]
        if len(tensors) != len(manifest.tensors):
            raise ShardFileError(
                f"{source}/{MANIFEST_NAME} records no shard spec for some tensors (written by "
                "an older build): load it at its tensor_parallel_size and save it again."
            )
    else:
        if present != [str(r) for r in range(len(present))]:
            raise ShardFileError(
                f"{source} holds shard files of ranks {', '.join(present)}, not 0..M-1: a "
                "rank's files are missing."
            )
        src_tp = len(present)
        sources = {r: find_rank_files(source, DEFAULT_PATTERN, r) for r in range(src_tp)}
        tensors, info = _layout_from_model(source, sources[0], src_tp, tp_size)

    check_tp_sizes(tensors, src_tp, tp_size)  # before the output directory is made

    def write(tmp: str) -> tuple[list[RankFiles], dict[str, Any]]:
        return write_resharded(tensors, sources, src_tp, tp_size, tmp, pattern, max_size), info

    return write


def _layout_from_model(
    source: str, rank0_files: list[str], src_tp: int, tp_size: int
) -> tuple[list[SavedTensor], dict[str, Any]]:
    """Tensors (in the order a CPU save stores them) and manifest fields of a save that
    has no manifest: the specs come from the model built on the meta device."""
    header: dict[str, dict] = {}
    for path in rank0_files:
        part, _, _ = read_header_json(path)
        part.pop("__metadata__", None)
        header.update(part)
    floats = [e["dtype"] for e in header.values() if e["dtype"] in ("F32", "F16", "BF16")]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[
        max(set(floats), key=floats.count) if floats else "F32"
    ]
    model_config = _model_config(source, dtype)
    state = _meta_state(model_config, 0, src_tp)
    if not onednn_packing_enabled(dtype, "cpu"):  # a CPU save writes its weight block order
        state = dict(plan_layout(state.items())[0])
    specs = {name: get_shard_spec(t) for name, t in state.items()}
    tensors = saved_tensors_from_headers(list(state), specs, header)
    info = {
        "architecture": model_config.architecture,
        "tensor_parallel_size": tp_size,
        "pipeline_parallel_size": 1,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": model_config.quantization,
        "quantization_config": None,
    }
    return tensors, info


def _hf_writer(source: str, tp_size: int, pattern: str, max_size: int | None, dtype: str) -> Writer:
    """The writer for a Hugging Face input: each rank's model built, loaded the default
    way and saved by the saver's functions, one rank at a time."""
    from tqdm import tqdm

    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.sharded_state.manifest import engine_config_info
    from vllm.model_executor.model_loader.sharded_state.saver import save_rank_files

    _model_config(source, dtype)  # a clear error for a directory without config.json
    engine_args = EngineArgs(model=source, tensor_parallel_size=tp_size, dtype=dtype, device="cpu")
    vllm_config = engine_args.create_engine_config()  # checks that N can split the model

    def write(tmp: str) -> tuple[list[RankFiles], dict[str, Any]]:
        records = []
        for rank in tqdm(range(tp_size), desc="Resharding", unit="rank"):
            with tensor_parallel_state(rank, tp_size):
                model = get_model_loader(vllm_config.load_config).load_model(vllm_config)
                records.append(
                    save_rank_files(model, tmp, pattern, max_size, rank, tp_size, vllm_config)
                )
            del model
            gc.collect()  # this rank's model is gone before the next one is built
        return records, engine_config_info(vllm_config)

    return write
