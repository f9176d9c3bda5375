"""The OpenAI-compatible server: ``vllm serve``."""
