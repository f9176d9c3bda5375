"""``load_format="dummy"``: random weights, for benchmarks and tests without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader


class DummyModelLoader(BaseModelLoader):
    """Random weights (uniform in [-1e-3, 1e-3]), seeded by the model config's seed."""

    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> set[str]:
        gen = torch.Generator(device=vllm_config.device_config.device)
        gen.manual_seed(vllm_config.model_config.seed)
        filled = set()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.uniform_(-1e-3, 1e-3, generator=gen)
                filled.add(name)
        return filled
