"""Save a model as a sharded-state checkpoint: every tensor-parallel rank writes its slice.

Shared by ``vllm save-sharded-state`` and examples/offline_inference/save_sharded_state.py
(upstream vLLM's script, which runs unchanged). Loading the result later reads, per rank,
only that rank's files:

    LLM(model=OUTPUT, load_format="sharded_state", tensor_parallel_size=<as saved>)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from vllm.transformers_utils.gguf_utils import is_gguf

DEFAULT_MAX_FILE_SIZE = 5 * 1024**3
# Weights are what the shards replace; everything else in the model directory is copied.
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_WEIGHT_INDEX_SUFFIXES = tuple(s + ".index.json" for s in _WEIGHT_SUFFIXES)
_SHARDED_STATE_MANIFEST = "sharded_state.json"


def add_save_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags upstream's example adds to the engine's."""
    parser.add_argument(
        "--output", "-o", required=True, type=str, help="Directory to write the checkpoint to."
    )
    parser.add_argument(
        "--file-pattern",
        type=str,
        help="File name pattern of the shards, with {rank} and {part} "
        "(default: 'model-rank-{rank}-part-{part}.safetensors').",
    )
    parser.add_argument(
        "--max-file-size",
        type=int,
        default=DEFAULT_MAX_FILE_SIZE,
        help="Largest shard file in bytes; a rank's state is split into parts below it "
        "(default: %(default)s, 5 GiB).",
    )
    return parser


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils import FlexibleArgumentParser

    if parser is None:
        parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    return add_save_args(parser)


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES + _WEIGHT_INDEX_SUFFIXES)


def copy_metadata_files(model_path: str, output: str) -> list[str]:
    """Copy the model's non-weight files (config, tokenizer, generation config, chat
    template) and its sub-directories, leaving out weights and weight indexes."""
    copied = []
    out = os.path.realpath(output)
    for name in sorted(os.listdir(model_path)):
        src = os.path.join(model_path, name)
        if _is_weight_file(name) or name == _SHARDED_STATE_MANIFEST or name.startswith("."):
            continue
        if os.path.realpath(src) == out:
            continue  # the output directory inside the model directory
        dst = os.path.join(output, name)
        if os.path.isdir(src):
            shutil.copytree(
                src,
                dst,
                ignore=lambda _dir, names: [n for n in names if _is_weight_file(n)],
                dirs_exist_ok=True,
            )
        else:
            shutil.copy(src, dst)
        copied.append(name)
    return copied


def save_metadata_files(llm: Any, model_path: str, output: str) -> None:
    """Give ``output`` what loading it needs besides the shards: the model directory's
    non-weight files, or for a GGUF file (which has no directory of its own) the config,
    tokenizer and generation config the engine read from it, as Hugging Face files."""
    if os.path.isdir(model_path):
        copy_metadata_files(model_path, output)
        return
    engine = llm.llm_engine
    config = copy.deepcopy(engine.model_config.hf_config)
    config.dtype = engine.model_config.dtype  # the shards' dtype, not the file's
    config.save_pretrained(output)
    llm.get_tokenizer().save_pretrained(output)
    with open(os.path.join(output, "generation_config.json"), "w") as f:
        json.dump(engine.generation_config, f, indent=2)


def main(args: argparse.Namespace) -> None:
    """Upstream's example, step by step."""
    from vllm import LLM, EngineArgs
    from vllm.model_executor.model_loader.sharded_state.directory import check_target
    from vllm.model_executor.model_loader.sharded_state.manifest import validate_pattern
    from vllm.model_executor.model_loader.sharded_state.saver import parse_max_size

    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.enable_lora:
        raise ValueError(
            "Saving with enable_lora=True is not supported: merge the adapter into the base "
            "weights first, then save the merged model."
        )
    model_path = engine_args.model
    if not Path(model_path).is_dir() and not is_gguf(model_path):
        raise ValueError(
            f"--model must be a local model directory or .gguf file, got {model_path!r} "
            "(models are never downloaded; the config and tokenizer files go to --output)."
        )
    # The save's own options are checked before the model loads.
    if args.file_pattern is not None:
        validate_pattern(args.file_pattern)
    parse_max_size(args.max_file_size)
    check_target(args.output)
    llm = LLM(**dataclasses.asdict(engine_args))
    output = Path(args.output)
    created = not output.exists()
    output.mkdir(exist_ok=True)
    try:
        # Every rank writes its own files, then the directory is swapped in atomically.
        llm.llm_engine.model_executor.save_sharded_state(
            path=args.output, pattern=args.file_pattern, max_size=args.max_file_size
        )
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the save's own error
            if created and not any(output.iterdir()):
                output.rmdir()  # leave no empty directory behind a failed save
        raise
    save_metadata_files(llm, model_path, args.output)
