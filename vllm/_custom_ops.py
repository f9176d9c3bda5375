"""Python entry points of the compiled kernels in csrc/, with their argument checks.

``vllm._C`` is optional: when it was not built (no C compiler at install time) or
``VLLM_USE_CPU_KERNELS=0`` is set, ``HAS_CPU_KERNELS`` is False and callers take their
pure-torch paths.
"""

from __future__ import annotations

import os

import torch

try:
    from vllm import _C
except ImportError:  # built without a compiler: the torch paths are used
    _C = None

HAS_CPU_KERNELS = _C is not None and os.environ.get("VLLM_USE_CPU_KERNELS", "1") != "0"

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_HEAD_SIZE = 256


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
