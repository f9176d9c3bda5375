"""Paged attention: a C kernel for CPU decodes, ``scaled_dot_product_attention`` otherwise.

The KV cache of a layer is a ``[2, num_slots, num_kv_heads, head_size]`` view of the
worker's one flat allocation; token ``p`` of a sequence lives in slot
``block_ids[p // block_size] * block_size + p % block_size``.

Per step the model runner builds one ``AttentionMetadata`` shared by every layer:
- decodes (one new token after a cached context) run batched: on the CPU through the
  C kernel ``vllm._C.paged_attention_decode``, which reads the blocks in place; without
  it (or on CUDA) as one SDPA call over the slots gathered into a padded batch and
  masked to each sequence's length;
- prefill chunks run one SDPA call per sequence, causal, over cached context plus chunk.
This is the only module that knows the cache layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops


@dataclass
class PrefillSeq:
    start: int  # index of the chunk's first token in the flattened batch
    num_tokens: int  # tokens in this chunk
    num_cached: int  # tokens already in the cache before this chunk
    kv_slots: torch.Tensor | None  # slots of the whole context when num_cached > 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V goes
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Decodes, batched: flattened token index, block tables (padded with block 0) and
    # context lengths.
    decode_token_idx: torch.Tensor | None = None  # [B]
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64
    decode_seq_lens: torch.Tensor | None = None  # [B] int64
    block_size: int = 16
    use_kernel: bool = False
    # The torch path's context slots and validity mask, derived on first use.
    _decode_slots_and_mask: tuple[torch.Tensor, torch.Tensor] | None = None

    def decode_slots_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_len] cache slot of every context position (slot 0 past the end) and
        the [B, 1, 1, max_len] mask of the real ones; computed once per step."""
        if self._decode_slots_and_mask is None:
            lens, tables, bs = self.decode_seq_lens, self.decode_block_tables, self.block_size
            pos = torch.arange(int(lens.max()), device=lens.device)
            valid = pos[None, :] < lens[:, None]
            slots = tables[:, pos // bs] * bs + pos % bs
            slots = torch.where(valid, slots, 0)
            self._decode_slots_and_mask = (slots, valid[:, None, None, :])
        return self._decode_slots_and_mask


def _slots(block_ids: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    return block_ids[positions // block_size] * block_size + positions % block_size


def build_attention_metadata(
    seqs: list[tuple[list[int], int, int]], block_size: int, device: torch.device
) -> AttentionMetadata:
    """``seqs``: per scheduled sequence in batch order, (block_ids, num_cached, num_new)."""
    slot_parts, prefills, dec_idx, dec_lens, dec_blocks = [], [], [], [], []
    offset = 0
    for block_ids, num_cached, num_new in seqs:
        blocks = np.asarray(block_ids, dtype=np.int64)
        total = num_cached + num_new
        slot_parts.append(_slots(blocks, np.arange(num_cached, total), block_size))
        if num_new == 1 and num_cached > 0:
            dec_idx.append(offset)
            dec_lens.append(total)
            dec_blocks.append(blocks)
        else:
            kv_slots = None
            if num_cached > 0:
                kv_slots = torch.from_numpy(_slots(blocks, np.arange(total), block_size))
                kv_slots = kv_slots.to(device)
            prefills.append(PrefillSeq(offset, num_new, num_cached, kv_slots))
        offset += num_new
    slot_mapping = torch.from_numpy(np.concatenate(slot_parts)).to(device)
    meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=prefills)
    if dec_idx:
        max_blocks = max(len(b) for b in dec_blocks)
        tables = np.zeros((len(dec_idx), max_blocks), dtype=np.int64)  # pad: block 0
        for i, blocks in enumerate(dec_blocks):
            tables[i, : len(blocks)] = blocks
        meta.decode_token_idx = torch.tensor(dec_idx, device=device)
        meta.decode_block_tables = torch.from_numpy(tables).to(device)
        meta.decode_seq_lens = torch.tensor(dec_lens, dtype=torch.int64, device=device)
        meta.block_size = block_size
        meta.use_kernel = ops.HAS_CPU_KERNELS and torch.device(device).type == "cpu"
    return meta


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_slots, Hkv, D]. Returns [T, Hq, D]."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if ops.use_cpu_kernels(k) and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]:
        ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q) if meta.prefills else q
    for p in meta.prefills:
        # 4-D inputs: with 3-D ones SDPA on the CPU falls back to its slow math kernel.
        qs = q[p.start : p.start + p.num_tokens].transpose(0, 1)[None]  # [1, Hq, n, D]
        if p.kv_slots is None:  # nothing cached: attend within the chunk
            ks = k[p.start : p.start + p.num_tokens].transpose(0, 1)[None]
            vs = v[p.start : p.start + p.num_tokens].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            ks = k_cache.index_select(0, p.kv_slots).transpose(0, 1)[None]  # [1, Hkv, total, D]
            vs = v_cache.index_select(0, p.kv_slots).transpose(0, 1)[None]
            total = p.num_cached + p.num_tokens
            mask = torch.ones(p.num_tokens, total, dtype=torch.bool, device=q.device)
            mask = mask.tril(diagonal=p.num_cached)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out[p.start : p.start + p.num_tokens] = o[0].transpose(0, 1)
    if meta.decode_token_idx is not None:
        # An all-decode batch holds one token per sequence in batch order: no gather.
        decode_only = not meta.prefills
        qd = q if decode_only else q[meta.decode_token_idx]  # [B, Hq, D]
        if meta.use_kernel and ops.decode_kernel_supports(q.shape[-1], q.dtype):
            o = ops.paged_attention_decode(
                qd,
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_seq_lens,
                meta.block_size,
                scale,
            )
        else:
            o = _decode_attention_torch(qd, k_cache, v_cache, meta, scale, gqa)
        if decode_only:
            return o
        out[meta.decode_token_idx] = o
    return out


def _decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    gqa: bool,
) -> torch.Tensor:
    """Gather each sequence's slots into a padded batch and run one masked SDPA call."""
    # index_select on the flat slot list copies whole rows: several times faster on the
    # CPU than advanced indexing with a 2-D index. Only written slots are gathered (the
    # padding is slot 0, kept finite): a masked-out NaN would still poison 0 * NaN.
    slots, mask = meta.decode_slots_and_mask()
    b, length = slots.shape
    flat = slots.view(-1)
    kd = k_cache.index_select(0, flat).view(b, length, *k_cache.shape[1:]).transpose(1, 2)
    vd = v_cache.index_select(0, flat).view(b, length, *v_cache.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return o.squeeze(2)
