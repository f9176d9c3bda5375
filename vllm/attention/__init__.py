from vllm.attention.backend import AttentionMetadata, build_attention_metadata
from vllm.attention.layer import Attention

__all__ = ["Attention", "AttentionMetadata", "build_attention_metadata"]
