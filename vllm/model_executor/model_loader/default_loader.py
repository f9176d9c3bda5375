"""``load_format`` "auto", "safetensors" or "pt": a Hugging Face checkpoint directory."""

from __future__ import annotations

import time

import torch
from torch import nn

from vllm.config import LoadConfig, VllmConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.safetensors.reader import ReadStats
from vllm.model_executor.model_loader.weight_utils import (
    find_weight_files,
    pt_weights_iterator,
    safetensors_weights_iterator,
)
from vllm.utils import gc_paused


class DefaultModelLoader(BaseModelLoader):
    """Hugging Face checkpoints: safetensors (lazy slices), or .bin/.pt (weights_only)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        # "verify" is read by save_sharded_state: re-read the files it writes.
        extra = dict(load_config.model_loader_extra_config or {})
        verify = extra.pop("verify", False)
        if extra:
            keys = ", ".join(sorted(extra))
            raise ValueError(
                f"model_loader_extra_config keys {keys} are not used by "
                f"load_format={load_config.load_format!r} (only 'verify', for a "
                "save_sharded_state of the loaded model, is)."
            )
        if not isinstance(verify, bool):
            raise ValueError(
                f"model_loader_extra_config 'verify' must be true or false, got {verify!r}."
            )

    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> set[str]:
        """Fill ``model``'s parameters (this rank's slices) from the checkpoint."""
        start = time.perf_counter()
        model_dir = vllm_config.model_config.model
        files, use_safetensors = find_weight_files(model_dir, self.load_config.load_format)
        iterate = safetensors_weights_iterator if use_safetensors else pt_weights_iterator
        stats = ReadStats()
        with torch.no_grad(), gc_paused():  # objects made per tensor trigger full collections
            loaded = model.load_weights(iterate(files, stats))
        self.report_weights_loaded(start, stats.bytes_read)
        return loaded
