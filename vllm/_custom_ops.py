"""Python entry points of the compiled kernels in csrc/, with their argument checks.

``vllm._C`` is optional: when it was not built (no C compiler at install time) or
``VLLM_USE_CPU_KERNELS=0`` is set, ``HAS_CPU_KERNELS`` is False and callers take their
pure-torch paths. Layers ask ``use_cpu_kernels(x)`` before calling a kernel here.

The in-place kernels keep upstream vLLM's names and argument order (``rms_norm``,
``fused_add_rms_norm``, ``silu_and_mul``, ``rotary_embedding``, ``reshape_and_cache``);
their rotary table is upstream's ``cos_sin_cache`` layout ([max_position, rotary_dim],
cos then sin).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from vllm.utils import cpu_has_avx512, cpu_lacks_native_gemm

try:
    from vllm import _C
except ImportError:  # built without a compiler: the torch paths are used
    _C = None

HAS_CPU_KERNELS = _C is not None and os.environ.get("VLLM_USE_CPU_KERNELS", "1") != "0"

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_HEAD_SIZE = 256


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the C kernels can take ``x``: built, enabled, on the CPU, a supported dtype."""
    return HAS_CPU_KERNELS and x.is_cpu and x.dtype in _DTYPE_CODES


def _check(cond: bool, op: str, message: str | Callable[[], str]) -> None:
    """Raise ``ValueError`` naming ``op`` unless ``cond``. A message that needs formatting
    is passed as a lambda: these checks run on every kernel call, and building the text
    only on failure saves most of their cost."""
    if not cond:
        raise ValueError(f"{op}: {message if isinstance(message, str) else message()}")


def _check_tensor(x: torch.Tensor, op: str) -> None:
    if _C is None:
        raise RuntimeError("vllm._C is not built; reinstall with a C compiler available.")
    _check(
        x.is_cpu and x.dtype in _DTYPE_CODES,
        op,
        lambda: f"needs a CPU tensor of {list(_DTYPE_CODES)}; got {x.dtype} on {x.device}.",
    )


def _rows(x: torch.Tensor, op: str) -> tuple[int, int]:
    """(rows, row stride) of a tensor whose last dim is packed and whose other dims
    flatten to rows of one stride."""
    _check_tensor(x, op)
    _check(x.dim() >= 1 and x.stride(-1) == 1, op, "the last dim must be contiguous.")
    rows = x.numel() // max(x.shape[-1], 1)
    if x.dim() == 1:
        return 1, x.shape[0]
    stride = x.stride(-2)
    for i in range(x.dim() - 3, -1, -1):  # leading dims must flatten onto one row stride
        _check(
            x.shape[i] == 1 or x.stride(i) == x.stride(i + 1) * x.shape[i + 1],
            op,
            "rows must be evenly strided.",
        )
    return rows, stride


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    """out = weight * input / sqrt(mean(input^2) + epsilon), row by row (float32 inside)."""
    _fused_rms_norm(out, input, None, weight, epsilon, "rms_norm")


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    """In place: residual = input + residual; input = rms_norm(residual) (upstream's op)."""
    _fused_rms_norm(input, input, residual, weight, epsilon, "fused_add_rms_norm")


def _fused_rms_norm(out, x, residual, weight, eps, op) -> None:
    hidden = x.shape[-1]
    for t in (out, x) if residual is None else (x, residual):
        _check(
            t.is_contiguous() and t.shape == x.shape and t.dtype == x.dtype,
            op,
            "input, out and residual must be contiguous with one shape and dtype.",
        )
    _check(
        weight.shape == (hidden,) and weight.dtype == x.dtype and weight.is_contiguous(),
        op,
        lambda: f"weight must be a contiguous [{hidden}] tensor of {x.dtype}.",
    )
    _rows(x, op)
    _C.rms_norm(
        out.data_ptr(),
        x.data_ptr(),
        0 if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        x.numel() // hidden,
        hidden,
        eps,
        _DTYPE_CODES[x.dtype],
        torch.get_num_threads(),
    )


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """out = silu(input[..., :d]) * input[..., d:], float32 inside."""
    rows, stride = _rows(input, "silu_and_mul")
    d = input.shape[-1] // 2
    _check(
        input.shape[-1] == 2 * d and out.shape == input.shape[:-1] + (d,),
        "silu_and_mul",
        lambda: f"out must be {list(input.shape[:-1]) + [d]} for input {list(input.shape)}.",
    )
    _check(
        out.is_contiguous() and out.dtype == input.dtype,
        "silu_and_mul",
        "out must be contiguous, in input's dtype.",
    )
    _C.silu_and_mul(
        out.data_ptr(),
        input.data_ptr(),
        rows,
        d,
        stride,
        _DTYPE_CODES[input.dtype],
        torch.get_num_threads(),
    )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Neox-style rotary embedding, in place on query [T, Hq * D] and key [T, Hkv * D].

    cos_sin_cache: float32 [max_position, rotary_dim], cos then sin of each position.
    Positions outside the table raise ``ValueError``.
    """
    op = "rotary_embedding"
    tokens, q_stride = _rows(query, op)
    k_tokens, k_stride = _rows(key, op)
    _check(
        positions.dtype == torch.int64
        and positions.is_contiguous()
        and positions.numel() == tokens == k_tokens,
        op,
        lambda: f"positions must be contiguous int64 with one entry per token ({tokens}).",
    )
    _check(
        query.shape[-1] % head_size == 0
        and key.shape[-1] % head_size == 0
        and key.dtype == query.dtype,
        op,
        f"rows must be whole heads of {head_size}.",
    )
    _check(
        cos_sin_cache.dtype == torch.float32
        and cos_sin_cache.is_contiguous()
        and cos_sin_cache.dim() == 2
        and cos_sin_cache.shape[1] % 2 == 0
        and cos_sin_cache.shape[1] <= head_size,
        op,
        "cos_sin_cache must be a contiguous float32 [max_position, rotary_dim] table.",
    )
    half = cos_sin_cache.shape[1] // 2
    _C.rotary_embedding(
        positions.data_ptr(),
        query.data_ptr(),
        key.data_ptr(),
        tokens,
        query.shape[-1] // head_size,
        key.shape[-1] // head_size,
        head_size,
        2 * half,
        q_stride,
        k_stride,
        cos_sin_cache.data_ptr(),
        cos_sin_cache.shape[0],
        _DTYPE_CODES[query.dtype],
        torch.get_num_threads(),
    )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key_cache[slot_mapping[t]] = key[t] and likewise for values.

    key, value: [T, Hkv, D] with packed heads; caches: [num_slots, Hkv, D] contiguous.
    Slots outside the cache raise ``ValueError``.
    """
    op = "reshape_and_cache"
    tokens = key.shape[0]
    row = key[0].numel() if tokens else 0
    for t in (key, value):
        _check(
            t.dim() == 3
            and t.shape == key.shape
            and t.dtype == key.dtype
            and t.stride(2) == 1
            and t.stride(1) == t.shape[2],
            op,
            "key and value must be [T, Hkv, D] with packed heads.",
        )
        _check_tensor(t, op)
    for c in (key_cache, value_cache):
        _check(
            c.is_contiguous()
            and c.shape[1:] == key.shape[1:]
            and c.dtype == key.dtype
            and c.shape == key_cache.shape,
            op,
            lambda: (
                f"caches must be contiguous [num_slots, {', '.join(map(str, key.shape[1:]))}] "
                f"of {key.dtype}."
            ),
        )
    _check(
        slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
        and slot_mapping.shape == (tokens,),
        op,
        lambda: f"slot_mapping must be int64 [{tokens}].",
    )
    if tokens:
        _C.reshape_and_cache(
            key.data_ptr(),
            value.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            slot_mapping.data_ptr(),
            tokens,
            row,
            key.stride(0),
            value.stride(0),
            key_cache.shape[0],
            _DTYPE_CODES[key.dtype],
        )


def argmax_logsumexp(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In one pass over float32 logits [S, V], each row's argmax (int64; the first
    maximum, NaN counting as the maximum, as ``torch.argmax``), its maximum ``m`` and
    ``log(sum(exp(row - m)))``: logsumexp is their sum, and
    ``log_softmax(row)[i] = (row[i] - m) - log_sum`` without rounding at large ``m``."""
    return _argmax_rows(logits, "argmax_logsumexp", with_logsumexp=True)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` of float32 logits [S, V] (the first maximum, NaN
    counting as the maximum), without ``argmax_logsumexp``'s exp over each row."""
    return _argmax_rows(logits, "argmax", with_logsumexp=False)[0]


def _argmax_rows(logits: torch.Tensor, op: str, with_logsumexp: bool):
    _check(logits.dtype == torch.float32 and logits.dim() == 2, op, "needs float32 [S, V].")
    rows, stride = _rows(logits, op)
    ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    maxes = torch.empty(rows, dtype=torch.float32, device=logits.device)
    log_sums = (
        torch.empty(rows, dtype=torch.float32, device=logits.device) if with_logsumexp else None
    )
    if rows:
        _C.argmax_logsumexp(
            logits.data_ptr(),
            rows,
            logits.shape[1],
            stride,
            ids.data_ptr(),
            maxes.data_ptr(),
            0 if log_sums is None else log_sums.data_ptr(),
            torch.get_num_threads(),
        )
    return ids, maxes, log_sums


_LOWP_DTYPES = (torch.bfloat16, torch.float16)


def _lowp_linear_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    op = "lowp_linear"
    _check(
        x.dtype in _LOWP_DTYPES and x.dim() == 2,
        op,
        f"needs a bfloat16 or float16 [M, K] input; got {x.dtype} {list(x.shape)}.",
    )
    _rows(x, op)
    _check_tensor(weight, op)
    n = weight.shape[0]
    _check(
        weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and weight.stride(1) == 1,
        op,
        f"weight must be {x.dtype} [N, {x.shape[1]}] with contiguous rows; got "
        f"{weight.dtype} {list(weight.shape)}, strides {weight.stride()}.",
    )
    _check(
        bias is None or (bias.dtype == x.dtype and bias.shape == (n,) and bias.is_contiguous()),
        op,
        f"bias must be a contiguous {x.dtype} [{n}].",
    )
    raise AssertionError("unreachable: lowp_linear's fast check and its messages disagree")


def lowp_linear_wanted(dtype: torch.dtype) -> bool:
    """Whether linear layers of ``dtype`` should take ``lowp_linear`` on this CPU: a
    16-bit dtype it has no native GEMM for (``vllm.utils.cpu_lacks_native_gemm``), on a
    CPU with AVX-512, where the kernel was measured faster than torch's emulation.
    ``VLLM_CPU_LOWP_LINEAR=0`` turns it off, ``=1`` also takes the kernel's portable path
    on other x86 CPUs (AVX2). Says nothing about whether ``vllm._C`` is built."""
    setting = os.environ.get("VLLM_CPU_LOWP_LINEAR", "")
    if dtype not in _LOWP_DTYPES or setting == "0" or not cpu_lacks_native_gemm(dtype):
        return False
    return setting == "1" or cpu_has_avx512()


def lowp_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for bfloat16 or float16 ``x`` [M, K] (rows may be strided) and a
    row-major ``weight`` [N, K] of the same dtype, products summed in float32 and rounded
    once, as torch does; made for CPUs that lack native 16-bit GEMMs, where it streams
    the 16-bit weight and widens it in registers. Returns [M, N]."""
    n, k = weight.shape if weight.dim() == 2 else (0, -1)
    # One test on the hot path (a decode step makes ~50 calls); the messages on failure.
    if not (
        x.dtype in _LOWP_DTYPES
        and weight.dtype == x.dtype
        and x.dim() == 2
        and x.shape[1] == k
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and x.is_cpu
        and weight.is_cpu
        and (
            bias is None or (bias.dtype == x.dtype and bias.shape == (n,) and bias.is_contiguous())
        )
    ):
        _lowp_linear_error(x, weight, bias)
    if x.shape[0] > 1 and x.stride(0) < k:  # rows that overlap (an expanded tensor)
        x = x.contiguous()
    rows, stride = x.shape[0], x.stride(0)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _C.lowp_linear(
        out.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        rows,
        n,
        k,
        n,
        stride,
        weight.stride(0),
        _DTYPE_CODES[x.dtype],
        torch.get_num_threads(),
    )
    return out


_W8_CODES = {torch.int8: 0, torch.float8_e4m3fn: 1}


def w8_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` [M, K] (float32/bfloat16/float16, rows may be strided) times 8-bit weights
    ``codes`` [N, K] (int8 or float8 E4M3, contiguous) scaled by ``scale`` [N, G] float32
    in G equal groups of columns, plus ``bias``; summed in float32. Returns [M, N]."""
    n, k = codes.shape
    _check(
        x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1 and x.dtype in _DTYPE_CODES
        and codes.dtype in _W8_CODES and codes.is_contiguous()
        and scale.dtype == torch.float32 and scale.is_contiguous() and scale.dim() == 2
        and scale.shape[0] == n and k % scale.shape[1] == 0
        and (bias is None
             or (bias.dtype == x.dtype and bias.shape == (n,) and bias.is_contiguous())),
        "w8_linear",
        lambda: f"got x {x.dtype} {list(x.shape)}, codes {codes.dtype} {list(codes.shape)}, "
        f"scale {scale.dtype} {list(scale.shape)}",
    )  # fmt: skip
    if x.shape[0] > 1 and x.stride(0) < k:
        x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    _C.w8_linear(
        out.data_ptr(), x.data_ptr(), codes.data_ptr(), scale.data_ptr(),
        0 if bias is None else bias.data_ptr(), x.shape[0], n, k, scale.shape[1], n,
        x.stride(0), _W8_CODES[codes.dtype], _DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return out


def decode_kernel_supports(head_size: int, dtype: torch.dtype) -> bool:
    """Whether ``paged_attention_decode`` takes this head size and dtype (built or not)."""
    return head_size % 8 == 0 and head_size <= _MAX_HEAD_SIZE and dtype in _DTYPE_CODES


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence over its cached context.

    query: [B, Hq, D] (rows may be strided); key_cache, value_cache: [num_slots, Hkv, D]
    contiguous, slot ``block_tables[b, p // block_size] * block_size + p % block_size``
    holding position ``p`` of sequence ``b``; block_tables: [B, max_blocks] int64;
    seq_lens: [B] int64, each from 1 to ``max_blocks * block_size``. Returns [B, Hq, D]
    in query's dtype. Lengths and the block ids they use are checked against the table and
    the cache (``ValueError``) before anything is read.
    """
    if _C is None:
        raise RuntimeError("vllm._C is not built; reinstall with a C compiler available.")
    b, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[1]
    dtype = query.dtype
    if not decode_kernel_supports(head_size, dtype):
        raise ValueError(
            f"paged_attention_decode takes head sizes that are multiples of 8 up to "
            f"{_MAX_HEAD_SIZE} and dtypes {list(_DTYPE_CODES)}; got {head_size} and {dtype}."
        )
    if key_cache.dtype != dtype or value_cache.dtype != dtype:
        raise ValueError("query and the KV cache must have the same dtype.")
    if query.device.type != "cpu":
        raise ValueError("paged_attention_decode is a CPU kernel.")
    if query.stride(2) != 1 or query.stride(1) != head_size:
        raise ValueError("query heads must be packed: strides (any, head_size, 1).")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous.")
    if num_heads % num_kv_heads or value_cache.shape != key_cache.shape:
        raise ValueError("num_heads must be a multiple of num_kv_heads; K and V caches alike.")
    if key_cache.shape[0] % block_size:
        raise ValueError(f"{key_cache.shape[0]} cache slots are not whole blocks of {block_size}.")
    if block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("block_tables and seq_lens must be int64.")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(
            f"{b} queries need block_tables [{b}, max_blocks] and seq_lens [{b}]; got "
            f"{list(block_tables.shape)} and {list(seq_lens.shape)}."
        )
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(b, num_heads, head_size, dtype=torch.float32)
    _C.paged_attention_decode(
        out.data_ptr(),
        query.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        block_tables.data_ptr(),
        seq_lens.data_ptr(),
        b,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        block_tables.shape[1],
        query.stride(0),
        key_cache.shape[0],
        scale,
        _DTYPE_CODES[dtype],
        torch.get_num_threads(),
    )
    return out if dtype == torch.float32 else out.to(dtype)
