"""Prompt types, as upstream's ``vllm.inputs``."""

from vllm.inputs.data import (
    PromptType,
    SingletonPrompt,
    TextPrompt,
    TokensPrompt,
    check_prompt_dict,
)

__all__ = ["PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt", "check_prompt_dict"]
