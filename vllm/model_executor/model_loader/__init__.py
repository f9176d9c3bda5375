"""Model loaders by ``load_format``; ``get_model`` builds and fills this rank's model."""

from __future__ import annotations

from torch import nn

from vllm.config import LoadConfig, VllmConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader
from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader


def get_model_loader(load_config: LoadConfig) -> BaseModelLoader:
    if load_config.load_format == "dummy":
        return DummyModelLoader(load_config)
    if load_config.load_format == "sharded_state":
        return ShardedStateLoader(load_config)
    if load_config.load_format == "gguf":
        # Imported here: the gguf package takes long to import, and most runs need none.
        from vllm.model_executor.model_loader.gguf.loader import GGUFModelLoader

        return GGUFModelLoader(load_config)
    return DefaultModelLoader(load_config)


def get_model(vllm_config: VllmConfig, loader: BaseModelLoader | None = None) -> nn.Module:
    """This rank's model, loaded by ``loader`` (by default the one for ``load_format``)."""
    loader = loader or get_model_loader(vllm_config.load_config)
    return loader.load_model(vllm_config)


__all__ = ["BaseModelLoader", "ShardedStateLoader", "get_model", "get_model_loader"]
