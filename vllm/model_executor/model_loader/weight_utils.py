"""Finding and iterating checkpoint files. Tensors come out lazily where the format allows."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from vllm.model_executor.model_loader.safetensors.reader import (
    ReadStats,
    close_all,
    default_num_threads,
)
from vllm.model_executor.model_loader.safetensors.slices import SafetensorsFile
from vllm.model_executor.utils import LoadedWeight

_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_weight_files(model_dir: str, load_format: str) -> tuple[list[str], bool]:
    """Return (files, use_safetensors) for ``load_format`` 'auto', 'safetensors' or 'pt'."""
    patterns = {
        "auto": ["*.safetensors", "*.bin", "*.pt"],
        "safetensors": ["*.safetensors"],
        "pt": ["*.bin", "*.pt"],
    }[load_format]
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(model_dir, pattern)))
        # Sharded-state files are not a Hugging Face checkpoint.
        files = [f for f in files if not os.path.basename(f).startswith("model-rank-")]
        files = _filter_by_index(model_dir, files)
        if files:
            return files, pattern == "*.safetensors"
    raise FileNotFoundError(
        f"No model weights found in {model_dir!r} for load_format={load_format!r} "
        f"(looked for {', '.join(patterns)})."
    )


def _filter_by_index(model_dir: str, files: list[str]) -> list[str]:
    """Keep only the files a weight index names (a directory may hold stray copies)."""
    for index_name in _WEIGHT_INDEX_FILES:
        path = os.path.join(model_dir, index_name)
        if os.path.isfile(path):
            with open(path) as f:
                names = set(json.load(f).get("weight_map", {}).values())
            kept = [f for f in files if os.path.basename(f) in names]
            if kept:
                return kept
    return files


def safetensors_weights_iterator(
    files: list[str], stats: ReadStats | None = None
) -> Iterator[tuple[str, LoadedWeight]]:
    """Yield (name, lazy slice): a rank reads only the part its weight_loader asks for,
    straight into the parameter; ``stats`` counts the bytes read.

    The reads run on a thread pool while the weight loaders go on (page faults on fresh
    parameter memory and copies from the page cache then use every core); the iterator
    ends once every read is done, raising the first read error.
    """
    opened: list[SafetensorsFile] = []
    with ThreadPoolExecutor(default_num_threads(), thread_name_prefix="weight-reader") as pool:
        try:
            for path in files:
                opened.append(SafetensorsFile(path, stats, pool))
                for name in opened[-1].keys():
                    yield name, opened[-1].get_slice(name)
                opened[-1].submit()  # its last reads start before the next file's
        except BaseException:  # the consumer stopped: its error is the one to see
            close_all(opened)
            raise
        error = close_all(opened)
        if error is not None:
            raise error


def pt_weights_iterator(
    files: list[str], stats: ReadStats | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors of .bin/.pt files; ``weights_only`` so a checkpoint never runs code.
    The files are memory-mapped; ``stats`` counts their sizes."""
    for path in files:
        if stats is not None:
            stats.bytes_read += os.path.getsize(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__}).")
        yield from state.items()
        del state
