"""The quantization methods ``quantization=`` names, each an 8-bit weight format:

- ``fp8``: float8 E4M3 weights, one scale per output channel (upstream's dynamic FP8 for
  16-bit checkpoints; activations stay 16-bit on the CPU);
- ``int8``: int8 weights, one scale per output channel (weight-only);
- ``deepspeedfp``: 8-bit floating-point weights in groups of ``group_size`` input
  columns, one scale per group (``weight_bits`` 8, as upstream's default).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm.model_executor.layers.quantization.base_config import (
    LinearMethodBase,
    QuantizationConfig,
)
from vllm.model_executor.layers.quantization.weight8 import Weight8Format, Weight8LinearMethod


class Weight8Config(QuantizationConfig):
    fmt: Weight8Format

    def get_linear_method(self, params_dtype: torch.dtype) -> LinearMethodBase:
        return Weight8LinearMethod(self.fmt, params_dtype, self.checkpoint_is_quantized)

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(
        cls, params: dict[str, Any], checkpoint_is_quantized: bool = False
    ) -> QuantizationConfig:
        _no_unknown_params(cls.name, params, set())
        return cls(checkpoint_is_quantized)


class Fp8Config(Weight8Config):
    name = "fp8"
    fmt = Weight8Format(torch.float8_e4m3fn, group_size=None)


class Int8Config(Weight8Config):
    name = "int8"
    fmt = Weight8Format(torch.int8, group_size=None)


class DeepSpeedFPConfig(Weight8Config):
    name = "deepspeedfp"

    def __init__(
        self, weight_bits: int = 8, group_size: int = 512, checkpoint_is_quantized: bool = False
    ) -> None:
        super().__init__(checkpoint_is_quantized)
        if weight_bits != 8:
            raise ValueError(
                f"deepspeedfp with weight_bits={weight_bits} is not supported; only 8-bit "
                "weights (weight_bits=8, the default) are."
            )
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"deepspeedfp group_size must be a positive int, got {group_size!r}.")
        self.weight_bits = weight_bits
        self.group_size = group_size
        self.fmt = Weight8Format(torch.float8_e4m3fn, group_size=group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"weight_bits": self.weight_bits, "group_size": self.group_size}

    @classmethod
    def from_dict(
        cls, params: dict[str, Any], checkpoint_is_quantized: bool = False
    ) -> QuantizationConfig:
        _no_unknown_params(cls.name, params, {"weight_bits", "group_size", "bits"})
        bits = params.get("weight_bits", params.get("bits", 8))
        return cls(bits, params.get("group_size", 512), checkpoint_is_quantized)


def _no_unknown_params(name: str, params: dict[str, Any], known: set[str]) -> None:
    unknown = set(params) - known - {"quant_method"}
    if unknown:
        raise ValueError(
            f"Unknown {name} quantization parameters {sorted(unknown)}; "
            f"known: {sorted(known) or 'none'}."
        )
