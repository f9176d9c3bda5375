"""The C decode kernel (vllm._C) against the pure-torch path it replaces."""

from __future__ import annotations

import os
import random

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.attention.backend import (
    _decode_attention_torch,
    build_attention_metadata,
    paged_attention,
)

needs_kernel = pytest.mark.skipif(ops._C is None, reason="vllm._C was not built")


def test_kernel_is_built_in_ci():
    # CI installs with a compiler: a build that silently fell back would hide a slow path.
    if os.environ.get("CI"):
        assert ops._C is not None, "vllm._C did not build; see the pip install log"


def _random_batch(lens, num_heads, num_kv_heads, head_size, block_size, dtype, seed=0):
    """Sequences of the given lengths scattered over shuffled cache blocks."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = 1 + sum(-(-n // block_size) for n in lens) + 3
    cache = torch.randn(2, num_blocks * block_size, num_kv_heads, head_size, generator=gen)
    cache = cache.to(dtype)
    free = list(range(1, num_blocks))  # block 0 is the torch path's padding block
    rng.shuffle(free)
    seqs = []
    for n in lens:
        nb = -(-n // block_size)
        blocks, free = free[:nb], free[nb:]
        seqs.append((blocks, n - 1, 1))  # decode: n - 1 cached tokens plus the new one
    meta = build_attention_metadata(seqs, block_size, torch.device("cpu"))
    q = torch.randn(len(lens), num_heads, head_size, generator=gen).to(dtype)
    return q, cache, meta


@needs_kernel
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size",
    [(12, 4, 64), (8, 8, 128), (4, 1, 80), (2, 2, 8), (6, 3, 256)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lens",
    [
        [2, 16, 17, 5, 200, 63],  # 2, exactly one block, one past a block, long ones
        [2, 3, 400, 2, 2, 2],  # one sequence holds most of the tokens the threads split
    ],
)
def test_kernel_matches_torch(num_heads, num_kv_heads, head_size, dtype, lens):
    q, cache, meta = _random_batch(lens, num_heads, num_kv_heads, head_size, 16, dtype)
    scale = head_size**-0.5
    out = ops.paged_attention_decode(
        q,
        cache[0],
        cache[1],
        meta.decode_block_tables,
        meta.decode_seq_lens,
        16,
        scale,
    )
    ref = _decode_attention_torch(
        q.float(), cache[0].float(), cache[1].float(), meta, scale, num_heads != num_kv_heads
    )
    assert out.dtype == dtype and out.shape == q.shape
    # float32 differs from SDPA only in summation order; 16-bit outputs are rounded once.
    atol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


@needs_kernel
def test_strided_query_rows():
    # Decode-only batches pass q as a view of the fused qkv output: rows are strided.
    q, cache, meta = _random_batch([7, 40, 33], 4, 2, 64, 16, torch.float32)
    wide = torch.cat([q.view(3, -1), torch.randn(3, 100)], dim=1)
    strided = wide[:, : 4 * 64].view(3, 4, 64)
    assert not strided.is_contiguous()
    args = (cache[0], cache[1], meta.decode_block_tables, meta.decode_seq_lens, 16, 0.125)
    torch.testing.assert_close(
        ops.paged_attention_decode(strided, *args), ops.paged_attention_decode(q, *args)
    )


@needs_kernel
def test_unsupported_inputs_name_what_works():
    q, cache, meta = _random_batch([5], 2, 2, 12, 16, torch.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        ops.paged_attention_decode(
            q, cache[0], cache[1], meta.decode_block_tables, meta.decode_seq_lens, 16, 1.0
        )


@needs_kernel
def test_out_of_range_tables_raise_instead_of_reading():
    q, cache, meta = _random_batch([5, 30], 2, 2, 64, 16, torch.float32)
    tables, lens = meta.decode_block_tables.clone(), meta.decode_seq_lens.clone()
    bad_block = tables.clone()
    bad_block[1, 1] = cache.shape[1] // 16  # one past the last block
    with pytest.raises(ValueError, match="outside the cache"):
        ops.paged_attention_decode(q, cache[0], cache[1], bad_block, lens, 16, 1.0)
    too_long = lens.clone()
    too_long[0] = tables.shape[1] * 16 + 1
    with pytest.raises(ValueError, match="length"):
        ops.paged_attention_decode(q, cache[0], cache[1], tables, too_long, 16, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_attention_decode(q, cache[0], cache[1], tables[:1], lens[:1], 16, 1.0)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_paged_attention_mixed_batch(monkeypatch, use_kernel):
    """Prefills and decodes in one step give the same rows as computing them apart."""
    if use_kernel and ops._C is None:
        pytest.skip("vllm._C was not built")
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", use_kernel)
    torch.manual_seed(0)
    heads, kv_heads, d, bs = 6, 2, 16, 4
    num_blocks = 20
    kv_cache = torch.zeros(2, num_blocks * bs, kv_heads, d)
    # Sequence A: 9 tokens cached in blocks 3, 7, 1; sequence B: a new 5-token prompt.
    cached = torch.randn(2, 9, kv_heads, d)
    a_blocks = [3, 7, 1]
    slots = torch.tensor([a_blocks[p // bs] * bs + p % bs for p in range(9)])
    kv_cache[:, slots] = cached
    q = torch.randn(6, heads, d)
    k = torch.randn(6, kv_heads, d)
    v = torch.randn(6, kv_heads, d)
    seqs = [([5, 6], 0, 5), (a_blocks, 9, 1)]  # B's prompt, then A's decode token
    meta = build_attention_metadata(seqs, bs, torch.device("cpu"))
    assert meta.use_kernel == use_kernel
    out = paged_attention(q, k, v, kv_cache, meta, 0.25)

    def reference(qs, ks, vs, causal):
        o = torch.nn.functional.scaled_dot_product_attention(
            qs.transpose(0, 1)[None],
            ks.repeat_interleave(3, 1).transpose(0, 1)[None],
            vs.repeat_interleave(3, 1).transpose(0, 1)[None],
            is_causal=causal,
            scale=0.25,
        )
        return o[0].transpose(0, 1)

    torch.testing.assert_close(out[:5], reference(q[:5], k[:5], v[:5], True))
    ka = torch.cat([cached[0], k[5:]])
    va = torch.cat([cached[1], v[5:]])
    torch.testing.assert_close(out[5:], reference(q[5:], ka, va, False), atol=1e-6, rtol=0)
