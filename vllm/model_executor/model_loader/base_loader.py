"""What every load format shares: the model built for this rank, then one fixed sequence.

``BaseModelLoader.load_model`` builds the model in the target dtype on the target device,
fills it (``load_weights``, the one step each format implements), checks that the
checkpoint filled it exactly (``check_state``), and lets layers convert the loaded
weights to their run-time form.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vllm.config import LoadConfig, ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.sharded_state.weight_region import build_region
from vllm.model_executor.model_loader.state_dict_utils import (
    filter_subtensors,
    record_initial_state,
)
from vllm.model_executor.model_loader.strict import check_state
from vllm.model_executor.models.registry import ModelRegistry
from vllm.utils import gc_paused

logger = init_logger(__name__)


@contextmanager
def set_default_torch_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default while the model is built, so that its parameters
    are created in the target dtype, not created in float32 and cast."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def repacks_weights(model: nn.Module) -> bool:
    """Whether a layer of ``model`` gives its weight new memory after loading (the
    layers say so, e.g. for oneDNN's packed layout): the weights are then read into
    the parameters, not laid out as a file or mapped."""
    return any(getattr(m, "repacks_weights", False) for m in model.modules())


def initialize_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """Construct the model with uninitialised parameters directly in the target dtype/device.

    On the CPU, unless linear weights are repacked after loading (``pack_linear_weight``),
    the state tensors are then moved into one block laid out as a sharded-state file
    (``weight_region``), which such a file is mapped over in one piece.
    """
    model_cls = ModelRegistry.resolve_model_cls(model_config.architecture)
    device = torch.device(device)
    # gc_paused: a model of thousands of modules triggers full collections as it grows,
    # a large part of the construction time of a model of many tensors.
    with gc_paused():
        with set_default_torch_dtype(model_config.dtype), device:
            model = model_cls(model_config.hf_config, model_config.quant_config).eval()
        # Out of the device context, whose mode intercepts every torch call.
        state = filter_subtensors(model.state_dict(keep_vars=True))
        record_initial_state(model, state)  # what save_sharded_state must write for it to load
        if device.type == "cpu" and not repacks_weights(model):
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


def process_weights_after_loading(model: nn.Module) -> None:
    """Let layers convert loaded weights to their run-time form (e.g. oneDNN packing)."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None:
            hook()


class BaseModelLoader(ABC):
    """Loads this rank's model for one ``load_format``; see the module docstring."""

    def __init__(self, load_config: LoadConfig):
        self.load_config = load_config
        self.bytes_read = 0  # checkpoint bytes this rank read or mapped, once loaded

    def report_weights_loaded(self, start: float, nbytes: int) -> None:
        """Log upstream's "Loading weights took" line and keep the bytes read."""
        log_weights_loaded(start, nbytes)
        self.bytes_read = nbytes

    def build_model(self, vllm_config: VllmConfig) -> nn.Module:
        """This rank's model, in the target dtype on the target device, not yet filled."""
        return initialize_model(vllm_config.model_config, vllm_config.device_config.torch_device)

    @abstractmethod
    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> set[str] | None:
        """Fill ``model`` (this rank's slices) from the checkpoint. Returns the names of
        the weights filled, for ``check_state``; or None from a loader that checked the
        checkpoint's whole state against the model before reading it."""

    def load_model(self, vllm_config: VllmConfig) -> nn.Module:
        """Build, fill, check, convert: the same sequence for every load format."""
        model = self.build_model(vllm_config)
        loaded = self.load_weights(model, vllm_config)
        if loaded is not None:
            params = dict.fromkeys(name for name, _ in model.named_parameters())
            # A model's load_weights refuses checkpoint names it does not know itself; a
            # name it returns may be a tied weight's second name, no parameter of its own.
            filled = dict.fromkeys(name for name in loaded if name in params)
            check_state(vllm_config.model_config.model, params, filled)
        with torch.no_grad():
            process_weights_after_loading(model)
        return model
