"""Activation functions by their Hugging Face config names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vllm import _custom_ops as ops


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        if ops.use_cpu_kernels(x) and x.stride(-1) == 1 and (x.dim() == 2 or x.is_contiguous()):
            out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
            ops.silu_and_mul(out, x)
            return out
        return F.silu(x[..., :d]) * x[..., d:]


class NewGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_new": NewGELU,
    "gelu_fast": FastGELU,
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


def get_act_fn(name: str) -> nn.Module:
    name = name.lower()
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Activation {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}."
        )
    return _ACTIVATIONS[name]()
