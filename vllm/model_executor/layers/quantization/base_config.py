"""What a quantization method is to the linear layers: how to make the weights, what to
do once they are loaded, and how to multiply by them.

A method is chosen per engine by ``QuantizationConfig`` (``quantization="fp8"`` ...) and
asked by every linear layer for its ``LinearMethodBase``. Layers that a method does not
quantize (embeddings, the LM head) keep their 16-bit weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from vllm.model_executor.layers.shard_spec import ShardSpec


class LinearMethodBase(ABC):
    """How one linear layer stores and applies its weight."""

    # Whether process_weights_after_loading gives the weight new memory (the loader then
    # reads into the parameters instead of laying them out as the file).
    repacks_weights: bool = False

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        out_features: int,
        in_features: int,
        weight_attrs: dict[str, Any],
        spec: ShardSpec,
    ) -> None:
        """Register ``layer.weight`` (and whatever else the method stores) for this
        rank's [out_features, in_features] part; ``spec`` is the weight's sharding."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded weights into the form ``apply`` multiplies by."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ W.T (+ bias)`` with the layer's weight."""


class QuantizationConfig(ABC):
    """One quantization method with its parameters, as the engine was asked for it."""

    name: ClassVar[str]

    def __init__(self, checkpoint_is_quantized: bool = False) -> None:
        # True when the weights arrive already quantized (a sharded_state checkpoint saved
        # by a quantized engine); False when they are quantized after loading.
        self.checkpoint_is_quantized = checkpoint_is_quantized

    @abstractmethod
    def get_linear_method(self, params_dtype: torch.dtype) -> LinearMethodBase:
        """The method for a linear layer whose unquantized weights are ``params_dtype``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The parameters a sharded-state manifest records next to the method's name."""

    @classmethod
    @abstractmethod
    def from_dict(
        cls, params: dict[str, Any], checkpoint_is_quantized: bool = False
    ) -> QuantizationConfig:
        """The config back from ``to_dict``'s output."""
