from vllm.model_executor.model_loader.loader import get_model, get_model_loader
from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader

__all__ = ["ShardedStateLoader", "get_model", "get_model_loader"]
