"""How linear layers multiply on the CPU: oneDNN-packed float32 weights, and 16-bit
weights on CPUs without native 16-bit GEMMs computed in float32.

The layers call ``linear`` and, after loading, ``pack_linear_weight``; nothing else needs
to know how a CPU GEMM is best run.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from vllm import _custom_ops as ops
from vllm.utils import cpu_lacks_native_gemm

# From this many rows on, a 16-bit linear layer on a CPU without native 16-bit GEMMs
# widens its weight to float32 for torch's float32 GEMM: the GEMM is compute-bound there
# and the copy pays for itself (at 128 rows of a 768 x 4096 layer: 5.6 ms against 6.9
# for ``lowp_linear``, 13.9 for torch's bfloat16 GEMM on a 2-core AVX-512 Xeon).
LOWP_WIDEN_MIN_ROWS = 128


@functools.cache
def _lowp_dtype(dtype: torch.dtype) -> bool:
    return ops.lowp_linear_wanted(dtype)


# Weight elements widened to float32 at a time (16 MiB): glibc serves blocks this size
# from its heap (``tune_cpu_malloc``), so a 7B model's 22016 x 4096 MLP projection does
# not fault in a fresh 360 MB copy per call.
LOWP_WIDEN_CHUNK = 1 << 22


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``F.linear`` in float32 on a widened copy of ``weight``, rounded to x's dtype, a
    block of output features at a time."""
    xf = x.float()
    n = weight.shape[0]
    step = max(1, LOWP_WIDEN_CHUNK // max(weight.shape[1], 1))
    if step >= n:
        out = F.linear(xf, weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    for a in range(0, n, step):
        b = min(a + step, n)
        part = F.linear(xf, weight[a:b].float(), None if bias is None else bias[a:b].float())
        out[:, a:b] = part
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` that also takes a weight packed by ``pack_linear_weight``, and that
    on a CPU without native bfloat16 / float16 GEMMs computes those dtypes in float32
    (``ops.lowp_linear`` for few rows, torch's float32 GEMM on a widened copy of the
    weight for many) instead of torch's emulation, about 3x slower on such CPUs."""
    if weight.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, "none", [], ""
        )
        return out.view(*x.shape[:-1], out.shape[-1])
    if (
        ops.HAS_CPU_KERNELS
        and x.is_cpu
        and _lowp_dtype(weight.dtype)
        and x.dtype == weight.dtype
        and weight.stride(-1) == 1  # the kernel reads whole rows of the weight
    ):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= LOWP_WIDEN_MIN_ROWS:
            out = _widened_linear(x2, weight, bias)
        else:
            out = ops.lowp_linear(x2, weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.linear(x, weight, bias)


def onednn_packing_enabled(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether ``pack_linear_weight`` repacks linear weights of this dtype and device:
    float32 always, bfloat16 / float16 where the CPU multiplies them natively (AVX512-BF16,
    AMX, AVX512-FP16), where oneDNN's packed GEMM is the fast one as for float32. On
    other CPUs 16-bit weights stay row-major for ``ops.lowp_linear``."""
    if (
        torch.device(device).type != "cpu"
        or not torch.backends.mkldnn.is_available()
        or os.environ.get("VLLM_CPU_ONEDNN_LINEAR", "1") == "0"
    ):
        return False
    if dtype == torch.float32:
        return True
    return _native_lowp_packing(dtype)


@functools.cache
def _native_lowp_packing(dtype: torch.dtype) -> bool:
    supported = {
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }.get(dtype)
    return supported is not None and supported() and not cpu_lacks_native_gemm(dtype)


def pack_linear_weight(module: nn.Module) -> None:
    """On the CPU, hold ``module.weight`` in oneDNN's blocked layout (float32, or a
    16-bit dtype the CPU multiplies natively: ``onednn_packing_enabled``).

    Small-batch GEMMs (decode steps) run about 2x faster on it than on a plain
    row-major weight; upstream vLLM's CPU backend repacks the same way. ``state_dict()``
    then yields an mkldnn tensor, which the sharded-state saver writes as a plain
    tensor. Set VLLM_CPU_ONEDNN_LINEAR=0 to keep plain weights.
    """
    w = module.weight
    if w.is_mkldnn or not onednn_packing_enabled(w.dtype, w.device.type):
        return
    packed = nn.Parameter(packed_copy(w), requires_grad=False)
    packed.__dict__.update(w.__dict__)  # keep weight_loader, output_dim, ...
    module.weight = packed


def packed_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's blocked layout (new memory), for ``linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
