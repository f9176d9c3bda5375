"""Rotary position embedding (neox style: rotate halves of the rotary dims)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from vllm import _custom_ops as ops


def rope_parameters(config: Any) -> dict:
    """The config's rope settings as transformers >= 5 standardises them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # older transformers configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        if getattr(config, "rotary_pct", None) is not None:
            params.setdefault("partial_rotary_factor", config.rotary_pct)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
    ):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        # Upstream's layout: [max_position, rotary_dim], cos then sin of half the dims.
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [num_tokens, num_heads * head_size]. The C kernel (CPU) rotates them in
        place and returns them; the torch path returns new tensors."""
        if (
            ops.use_cpu_kernels(q)
            and q.stride(-1) == 1
            and k.stride(-1) == 1
            and self.cos_sin_cache.dtype == torch.float32
        ):
            ops.rotary_embedding(positions, q, k, self.head_size, self.cos_sin_cache)
            return q, k
        cos, sin = self.cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_size)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if rest.shape[-1]:
            rotated = torch.cat((rotated, rest), dim=-1)
        return rotated.reshape(shape)


_ROPE_CACHE: dict[str, RotaryEmbedding] = {}


def get_rope(config: Any, head_size: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding a Hugging Face config describes, one instance per distinct
    setting: every layer shares it, as upstream's ``get_rope`` does (a table per layer
    would cost ``max_position x rotary_dim x 4`` bytes each, 1 MiB for head size 128 at
    2048 positions).

    Non-default rope types (linear, llama3, yarn, ...) take their inverse frequencies
    from transformers' own ``ROPE_INIT_FUNCTIONS``.
    """
    params = rope_parameters(config)
    device = str(torch.get_default_device())  # models are built under a device context
    # Other rope types read more of the config (ROPE_INIT_FUNCTIONS): key on all of it.
    extra = None
    if params["rope_type"] != "default":
        extra = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    key = json.dumps([head_size, max_position, device, params, extra], sort_keys=True, default=repr)
    if key not in _ROPE_CACHE:
        _ROPE_CACHE[key] = _build_rope(config, params, head_size, max_position)
    return _ROPE_CACHE[key]


def _build_rope(config: Any, params: dict, head_size: int, max_position: int) -> RotaryEmbedding:
    rotary_dim = int(head_size * params.get("partial_rotary_factor", 1.0))
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        scaling = 1.0
    else:
        if rope_type == "dynamic":
            raise ValueError("rope_type 'dynamic' is not supported yet; use a static rope type.")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"Unknown rope_type {rope_type!r} in the model config.")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return RotaryEmbedding(head_size, rotary_dim, max_position, inv_freq, scaling)
