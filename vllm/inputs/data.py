"""The prompt shapes ``LLM.generate`` and ``LLMEngine.add_request`` take, as upstream vLLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the engine."""

    prompt: str
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt as token ids; ``prompt`` is its text, reported back in the output."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


SingletonPrompt = str | TextPrompt | TokensPrompt
PromptType = SingletonPrompt

# Keys that change nothing for this engine's text-only decoders: processor options that
# only apply to multi-modal data, a salt that only scopes prefix-cache sharing, the
# segment ids of encoder models.
_IGNORED_KEYS = frozenset(
    {"mm_processor_kwargs", "multi_modal_uuids", "cache_salt", "token_type_ids"}
)
_KNOWN_KEYS = frozenset({"prompt", "prompt_token_ids"}) | _IGNORED_KEYS


def check_prompt_dict(prompt: Mapping[str, Any]) -> None:
    """Refuse a prompt dict whose keys this engine would have to ignore at the cost of a
    different result (multi-modal data, prompt embeddings) or does not know at all."""
    if prompt.get("multi_modal_data") is not None:
        raise ValueError(
            "multi_modal_data is not supported: this engine runs text-only models; pass a "
            "TextPrompt or TokensPrompt without it."
        )
    unknown = sorted(set(prompt) - _KNOWN_KEYS - {"multi_modal_data"})
    if unknown:
        raise ValueError(
            f"Unsupported prompt key(s) {', '.join(map(repr, unknown))}: a prompt dict takes "
            "'prompt' (TextPrompt) or 'prompt_token_ids' (TokensPrompt), see vllm.inputs."
        )
