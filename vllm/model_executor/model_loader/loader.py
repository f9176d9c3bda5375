"""Model loaders by ``load_format``: build the model in the target dtype, then fill it."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch
from torch import nn

from vllm.config import LoadConfig, ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import onednn_packing_enabled
from vllm.model_executor.model_loader.safetensors.reader import ReadStats
from vllm.model_executor.model_loader.sharded_state.weight_region import build_region
from vllm.model_executor.model_loader.state_dict_utils import (
    filter_subtensors,
    record_initial_state,
)
from vllm.model_executor.model_loader.weight_utils import (
    find_weight_files,
    pt_weights_iterator,
    safetensors_weights_iterator,
)
from vllm.model_executor.models.registry import ModelRegistry
from vllm.utils import gc_paused

logger = init_logger(__name__)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def initialize_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """Construct the model with uninitialised parameters directly in the target dtype/device.

    On the CPU, unless linear weights are repacked after loading (``pack_linear_weight``),
    the state tensors are then moved into one block laid out as a sharded-state file
    (``weight_region``), which such a file is mapped over in one piece.
    """
    model_cls = ModelRegistry.resolve_model_cls(model_config.architecture)
    device = torch.device(device)
    # gc_paused: a model of thousands of modules triggers full collections as it grows,
    # ~40% of the construction time of a 12k-tensor model in a fresh process.
    with gc_paused():
        with _default_dtype(model_config.dtype), device:
            model = model_cls(model_config.hf_config).eval()
        # Out of the device context, whose mode intercepts every torch call.
        state = filter_subtensors(model.state_dict(keep_vars=True))
        record_initial_state(model, state)  # what save_sharded_state must write for it to load
        if device.type == "cpu" and not onednn_packing_enabled(model_config.dtype, device):
            # Repacked weights would keep their loaded pages in the block alive.
            build_region(model, state)
    return model


def log_weights_loaded(start: float, nbytes: int) -> float:
    """Upstream's "Loading weights took" line, with the bytes read and the rate; returns
    the seconds since ``start`` (a ``time.perf_counter()`` taken before opening files)."""
    seconds = time.perf_counter() - start
    logger.info(
        "Loading weights took %.2f seconds, read %.2f GB at %.2f GB/s",
        seconds,
        nbytes / 1e9,
        nbytes / 1e9 / max(seconds, 1e-9),
    )
    return seconds


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        raise ValueError(
            f"Following weights were not initialized from checkpoint: {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)} missing)."
        )


class BaseModelLoader(ABC):
    def __init__(self, load_config: LoadConfig):
        self.load_config = load_config
        self.bytes_read = 0  # checkpoint bytes this rank read or mapped, once loaded

    def report_weights_loaded(self, start: float, nbytes: int) -> None:
        """Log upstream's "Loading weights took" line and keep the bytes read."""
        log_weights_loaded(start, nbytes)
        self.bytes_read = nbytes

    @abstractmethod
    def load_model(self, vllm_config: VllmConfig) -> nn.Module:
        """Build the model for this rank and fill it."""


class DefaultModelLoader(BaseModelLoader):
    """Hugging Face checkpoints: safetensors (lazy slices), or .bin/.pt (weights_only)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        if load_config.model_loader_extra_config:
            keys = ", ".join(sorted(load_config.model_loader_extra_config))
            raise ValueError(
                f"model_loader_extra_config keys {keys} are not used by "
                f"load_format={load_config.load_format!r}."
            )

    def load_model(self, vllm_config: VllmConfig) -> nn.Module:
        model = initialize_model(vllm_config.model_config, vllm_config.device_config.torch_device)
        self.load_weights(model, vllm_config)
        return model

    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> None:
        """Fill ``model``'s parameters (this rank's slices) from the checkpoint."""
        start = time.perf_counter()
        model_dir = vllm_config.model_config.model
        files, use_safetensors = find_weight_files(model_dir, self.load_config.load_format)
        iterate = safetensors_weights_iterator if use_safetensors else pt_weights_iterator
        stats = ReadStats()
        with torch.no_grad(), gc_paused():  # objects made per tensor trigger full collections
            loaded = model.load_weights(iterate(files, stats))
        check_all_loaded(model, loaded)
        self.report_weights_loaded(start, stats.bytes_read)


class DummyModelLoader(BaseModelLoader):
    """Random weights (uniform in [-1e-3, 1e-3]) for benchmarks and tests."""

    def load_model(self, vllm_config: VllmConfig) -> nn.Module:
        model = initialize_model(vllm_config.model_config, vllm_config.device_config.torch_device)
        gen = torch.Generator(device=vllm_config.device_config.device)
        gen.manual_seed(vllm_config.model_config.seed)
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-1e-3, 1e-3, generator=gen)
        return model


def get_model_loader(load_config: LoadConfig) -> BaseModelLoader:
    if load_config.load_format == "dummy":
        return DummyModelLoader(load_config)
    if load_config.load_format == "sharded_state":
        from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader

        return ShardedStateLoader(load_config)
    if load_config.load_format == "gguf":
        from vllm.model_executor.model_loader.gguf_loader import GGUFModelLoader

        return GGUFModelLoader(load_config)
    return DefaultModelLoader(load_config)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let layers convert loaded weights to their run-time form (e.g. oneDNN packing)."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None:
            hook()


def get_model(vllm_config: VllmConfig, loader: BaseModelLoader | None = None) -> nn.Module:
    """This rank's model, loaded by ``loader`` (by default the one for ``load_format``)."""
    loader = loader or get_model_loader(vllm_config.load_config)
    model = loader.load_model(vllm_config)
    with torch.no_grad():
        process_weights_after_loading(model)
    return model


def __getattr__(name: str):
    # Older upstream code imports ShardedStateLoader from this module.
    if name == "ShardedStateLoader":
        from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader

        return ShardedStateLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
