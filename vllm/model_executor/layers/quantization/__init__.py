"""Quantization methods by the name ``quantization=`` takes."""

from __future__ import annotations

from typing import Any

from vllm.model_executor.layers.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
)
from vllm.model_executor.layers.quantization.configs import (
    DeepSpeedFPConfig,
    Fp8Config,
    Int8Config,
)

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    cls.name: cls for cls in (Fp8Config, Int8Config, DeepSpeedFPConfig)
}


def get_quantization_config(
    name: str, params: dict[str, Any] | None = None, checkpoint_is_quantized: bool = False
) -> QuantizationConfig:
    """The config of method ``name`` with ``params`` (a manifest's or the model
    config's ``quantization_config``)."""
    if name not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization={name!r} is not supported; use one of "
            f"{', '.join(map(repr, QUANTIZATION_METHODS))} or None."
        )
    return QUANTIZATION_METHODS[name].from_dict(params or {}, checkpoint_is_quantized)


__all__ = [
    "QUANTIZATION_METHODS",
    "LinearMethodBase",
    "QuantizationConfig",
    "get_quantization_config",
]
