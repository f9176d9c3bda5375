"""The attention layer models call; the step's metadata and KV cache are bound to it."""

from __future__ import annotations

import torch
from torch import nn

from vllm.attention.backend import AttentionMetadata, paged_attention


class Attention(nn.Module):
    """Paged multi-head attention over this rank's heads.

    ``kv_cache`` is set by the worker (a view into its one allocation); the per-step
    metadata comes from the forward context the model runner sets.
    """

    def __init__(
        self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache: torch.Tensor | None = None
        # Upstream vLLM's Attention carries these float32 scalars (1.0 unless an fp8 KV
        # cache sets them) as persistent buffers; keeping them makes our state_dict names
        # match upstream's, so sharded-state checkpoints load in both directions.
        for name in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
            self.register_buffer(name, torch.tensor(1.0, dtype=torch.float32))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq * D], k/v: [T, Hkv * D] -> [T, Hq * D]."""
        meta = get_attn_metadata()
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound; the worker must allocate it.")
        t = q.shape[0]
        out = paged_attention(
            q.view(t, self.num_heads, self.head_size),
            k.view(t, self.num_kv_heads, self.head_size),
            v.view(t, self.num_kv_heads, self.head_size),
            self.kv_cache,
            meta,
            self.scale,
        )
        return out.view(t, self.num_heads * self.head_size)


_ATTN_METADATA: AttentionMetadata | None = None


def set_attn_metadata(meta: AttentionMetadata | None) -> None:
    global _ATTN_METADATA
    _ATTN_METADATA = meta


def get_attn_metadata() -> AttentionMetadata:
    if _ATTN_METADATA is None:
        raise RuntimeError("No attention metadata set; run the model through the ModelRunner.")
    return _ATTN_METADATA
