"""vLLM-compatible inference engine. Heavy imports are lazy so ``vllm.core`` stays torch-free."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LLM": "vllm.entrypoints.llm",
    "SamplingParams": "vllm.sampling_params",
    "EngineArgs": "vllm.engine.arg_utils",
    "LLMEngine": "vllm.engine.llm_engine",
    "RequestOutput": "vllm.outputs",
    "CompletionOutput": "vllm.outputs",
    "ModelRegistry": "vllm.model_executor.models.registry",
}

__all__ = [
    "__version__",
    "LLM",
    "SamplingParams",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "CompletionOutput",
    "ModelRegistry",
]

if TYPE_CHECKING:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.engine.llm_engine import LLMEngine
    from vllm.entrypoints.llm import LLM
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import SamplingParams


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vllm' has no attribute {name!r}")
