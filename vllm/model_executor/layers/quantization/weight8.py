"""8-bit weights with float32 scales, quantized after loading: the linear method behind
``fp8``, ``int8`` and ``deepspeedfp``.

A weight [N, K] is stored as 8-bit codes [N, K] (float8 E4M3 or int8) and a float32
``weight_scale`` [N, G]: one scale per output channel (G = 1) or per group of
``group_size`` input columns (G = K / group_size); the weight is ``code * scale``. A scale
is the group's largest magnitude over the format's largest code, so every code is in
range. Activations keep their dtype: the layer multiplies them by the weight
dequantized one tile of rows at a time, so no 16-bit copy of a whole weight is kept.

Per-channel scales of a row-parallel layer (its input columns split over the ranks) are
taken over the whole row, across ranks, so the scale is the same at every TP size and a
saved checkpoint reshards like the 16-bit weights. Groups never cross a rank's columns
(a rank whose row part is shorter than a group makes it one group), so a grouped
checkpoint reshards where the groups of both sizes coincide and is refused elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm import _custom_ops as ops
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.quantization.base_config import LinearMethodBase
from vllm.model_executor.layers.shard_spec import Segment, ShardSpec
from vllm.model_executor.utils import set_weight_attrs

# Elements of a weight dequantized at once: a few hundred KiB of float32, cache-resident.
_TILE_ELEMENTS = 1 << 16
# Up to this many input rows the kernel's single pass over the weight wins; beyond, the
# GEMM on dequantized tiles does (the kernel recomputes each weight's widening per
# group of 4 rows).
_KERNEL_MAX_ROWS = 16


@dataclass(frozen=True)
class Weight8Format:
    code_dtype: torch.dtype  # torch.float8_e4m3fn or torch.int8
    group_size: int | None  # None: one scale per output channel

    @property
    def max_code(self) -> float:
        return 448.0 if self.code_dtype == torch.float8_e4m3fn else 127.0


def num_groups(fmt: Weight8Format, in_features: int, what: str = "weight") -> int:
    """Scales per output channel of a [*, in_features] weight in ``fmt``.

    Groups are equal and never cross the row: ``group_size`` columns where that divides
    the row, else the largest size below it that does (576 columns in groups of 512 are
    two groups of 288). The groups of two TP sizes then coincide exactly when their
    counts over the whole row do, which is what resharding compares.
    """
    if fmt.group_size is None or in_features <= fmt.group_size:
        return 1
    size = next(g for g in range(fmt.group_size, 0, -1) if in_features % g == 0)
    if size * 16 < fmt.group_size:
        raise ValueError(
            f"{what} has {in_features} input columns on this rank, which split into equal "
            f"groups of at most group_size={fmt.group_size} only as groups of {size}; use a "
            f"group_size near a divisor of {in_features}."
        )
    return in_features // size


def quantize(
    weight: torch.Tensor, fmt: Weight8Format, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K], scale [N, G] float32) of ``weight`` [N, K]. ``amax`` [N, G]: the
    largest magnitudes to scale by, if not this weight's own (a row split over ranks)."""
    n, k = weight.shape
    groups = num_groups(fmt, k)
    w = weight.detach().float().view(n, groups, k // groups)
    if amax is None:
        amax = w.abs().amax(dim=-1)
    scale = amax / fmt.max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    q = w / scale[:, :, None]
    if fmt.code_dtype == torch.int8:
        codes = q.round().clamp(-127, 127).to(torch.int8)
    else:
        codes = q.clamp(-448, 448).to(fmt.code_dtype)  # round to nearest even
    return codes.view(n, k), scale


def codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes as float32 values, exactly.

    torch converts float8 element by element; an E4M3 byte moved into the exponent and
    mantissa fields of a float16 (one exponent bias apart: 2^8) converts vectorized.
    """
    if codes.dtype == torch.int8:
        return codes.float()
    u = codes.view(torch.uint8).to(torch.int16)
    half = (((u & 0x80) << 8) | ((u & 0x7F) << 7)).view(torch.float16)
    return half.float() * 256.0


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` [N, K] in ``dtype`` (scale [N, G], groups of K / G columns)."""
    n, k = codes.shape
    groups = scale.shape[1]
    w = codes_to_float(codes).view(n, groups, k // groups) * scale[:, :, None]
    return w.view(n, k).to(dtype)


def weight8_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, dequantize(codes, scale), bias)``: for few rows on the CPU, the C
    kernel that reads the 8-bit weight once and widens it in registers; otherwise one tile
    of weight rows dequantized at a time, each multiplied by torch's GEMM."""
    n, k = codes.shape
    rows = x.numel() // k
    if rows <= _KERNEL_MAX_ROWS and ops.use_cpu_kernels(x) and codes.is_cpu:
        out = ops.w8_linear(x.reshape(rows, k), codes, scale, bias)
        return out.view(*x.shape[:-1], n)
    rows = max(1, _TILE_ELEMENTS // k)
    if n <= rows:
        return F.linear(x, dequantize(codes, scale, x.dtype), bias)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    for r in range(0, n, rows):
        w = dequantize(codes[r : r + rows], scale[r : r + rows], x.dtype)
        out[..., r : r + rows] = F.linear(x, w, None if bias is None else bias[r : r + rows])
    return out


def scale_spec(weight_spec: ShardSpec, fmt: Weight8Format, groups: int, tp_size: int) -> ShardSpec:
    """How ``weight_scale`` [N, groups] is sharded, given its weight's ``weight_spec``: by
    rows as the weight when output channels are split; when input columns are, by groups
    (each rank's own), while per-channel scales are the same on every rank."""
    if weight_spec.dim == 0:
        return ShardSpec(0, weight_spec.segments)
    if weight_spec.dim == 1 and fmt.group_size is not None:
        return ShardSpec(1, (Segment(groups * tp_size),))
    return ShardSpec.replicated()


class Weight8LinearMethod(LinearMethodBase):
    """Codes and scales in memory; from 16-bit weights quantized after loading, or
    from a checkpoint that holds them already."""

    def __init__(
        self, fmt: Weight8Format, params_dtype: torch.dtype, checkpoint_is_quantized: bool
    ) -> None:
        self.fmt = fmt
        self.params_dtype = params_dtype
        self.checkpoint_is_quantized = checkpoint_is_quantized
        # Quantizing after loading replaces the loaded weight with new memory.
        self.repacks_weights = not checkpoint_is_quantized

    def create_weights(
        self,
        layer: nn.Module,
        out_features: int,
        in_features: int,
        weight_attrs: dict[str, Any],
        spec: ShardSpec,
    ) -> None:
        groups = num_groups(self.fmt, in_features, f"{type(layer).__name__}'s weight")
        dtype = self.fmt.code_dtype if self.checkpoint_is_quantized else self.params_dtype
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        set_weight_attrs(layer.weight, {"shard_spec": spec, **weight_attrs})
        if self.checkpoint_is_quantized:
            self._register_scale(layer, torch.empty(out_features, groups, dtype=torch.float32))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.checkpoint_is_quantized:
            return
        weight = layer.weight
        amax = None
        if weight.shard_spec.dim == 1 and self.fmt.group_size is None and layer.tp_size > 1:
            # The whole row's largest magnitude, so the scale does not depend on TP.
            amax = weight.detach().float().abs().amax(dim=1, keepdim=True)
            amax = tensor_model_parallel_all_reduce(amax, op="max")
        codes, scale = quantize(weight, self.fmt, amax)
        quantized = nn.Parameter(codes, requires_grad=False)
        quantized.__dict__.update(weight.__dict__)  # weight_loader, shard_spec, ...
        layer.weight = quantized
        self._register_scale(layer, scale)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return weight8_linear(x, layer.weight, layer.weight_scale, bias)

    def _register_scale(self, layer: nn.Module, scale: torch.Tensor) -> None:
        """``layer.weight_scale`` [N, groups], sharded as its weight dictates."""
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        spec = scale_spec(layer.weight.shard_spec, self.fmt, scale.shape[1], layer.tp_size)
        set_weight_attrs(layer.weight_scale, {"shard_spec": spec})
