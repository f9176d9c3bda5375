from vllm.model_executor.model_loader.loader import get_model, get_model_loader

__all__ = ["get_model", "get_model_loader"]
