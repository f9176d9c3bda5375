"""Normalisation layers, computed in float32 as Hugging Face does."""

from __future__ import annotations

import torch
from torch import nn

from vllm import _custom_ops as ops
from vllm.model_executor.utils import default_weight_loader, set_weight_attrs


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False,
        )
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x`` (after adding ``residual`` when given, returning the sum too).

        With the C kernels (CPU) the residual add is fused and done in place: ``x`` and
        ``residual`` are overwritten with the output and the sum, as upstream does.
        """
        if ops.use_cpu_kernels(x) and x.is_contiguous() and x.dtype == self.weight.dtype:
            if residual is None:
                out = torch.empty_like(x)
                ops.rms_norm(out, x, self.weight, self.eps)
                return out
            if residual.is_contiguous():
                ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
                return x, residual
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(orig_dtype)
        return out if residual is None else (out, residual)
