"""Chat conversations to prompt text: the one path ``LLM.chat`` and the server's chat and
tokenize endpoints share, so a conversation renders the same way everywhere."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from vllm.logger import init_logger

logger = init_logger(__name__)

ChatCompletionMessageParam = Mapping[str, Any]
ChatTemplateContentFormatOption = Literal["auto", "string", "openai"]
ChatTemplateContentFormat = Literal["string", "openai"]

_CONTENT_FORMATS = ("auto", "string", "openai")
# Message fields besides role and content that templates read (tool use); passed through.
_PASSTHROUGH_FIELDS = ("name", "tool_calls", "tool_call_id")


class ChatTemplateError(ValueError):
    """A conversation that cannot be rendered: no template, bad messages, a failing template.

    ``param`` names the request field at fault, for the server's error body.
    """

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def load_chat_template(value: str | os.PathLike | None) -> str | None:
    """``--chat-template`` / ``chat_template=``: a file's contents, or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    value = str(value)
    if "{" in value:  # Jinja syntax: the template itself
        return value
    raise ValueError(
        f"Chat template {value!r} (--chat-template, chat_template=) is neither a file nor a "
        "Jinja template; give the path of a template file (e.g. template.jinja) or the "
        "template text."
    )


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """The template to render with: the one given, else the tokenizer's own."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates; "default" is the one to use
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            "This model's tokenizer has no chat template, and none was given, so the "
            "conversation cannot be rendered. Pass one: LLM.chat(..., chat_template=<Jinja "
            "text>) offline, or start the server with --chat-template FILE; or send plain "
            "prompts (LLM.generate, /v1/completions)."
        )
    return template


@functools.lru_cache(maxsize=16)
def _detect_content_format(template: str) -> ChatTemplateContentFormat:
    """'openai' when the template loops over a message's content parts, else 'string'."""
    try:
        from jinja2 import Environment, nodes

        ast = Environment().parse(template)
    except Exception:  # not parseable here: the string form works with most templates
        return "string"
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter) and it.node is not None:  # content | list
            it = it.node
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const):
            if it.arg.value == "content":
                return "openai"
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return "openai"
    return "string"


def resolve_chat_template_content_format(
    chat_template: str | None,
    tools: list[dict[str, Any]] | None,
    given_format: ChatTemplateContentFormatOption,
    tokenizer: Any,
) -> ChatTemplateContentFormat:
    """How message content reaches the template: one string, or OpenAI's list of parts.

    'auto' reads the template: one that iterates over ``message['content']`` gets parts.
    """
    if given_format not in _CONTENT_FORMATS:
        raise ChatTemplateError(
            f"chat_template_content_format={given_format!r} is not one of "
            f"{', '.join(map(repr, _CONTENT_FORMATS))}.",
            param="chat_template_content_format",
        )
    if given_format != "auto":
        return given_format
    return _detect_content_format(resolve_chat_template(tokenizer, chat_template))


def _text_parts(content: Any, index: int) -> list[str]:
    """The texts of a message's content: a string, None, or a list of text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"messages[{index}].content must be a string or a list of parts, got "
            f"{type(content).__name__}."
        )
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping) or part.get("type", "text") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"messages[{index}].content: only text parts are supported, got a part of "
                f"type {kind!r}."
            )
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(
                f"messages[{index}].content: a text part needs a 'text' string."
            )
        texts.append(part["text"])
    return texts


def parse_chat_messages(
    messages: Iterable[ChatCompletionMessageParam],
    content_format: ChatTemplateContentFormat = "string",
) -> list[dict[str, Any]]:
    """Messages as a chat template expects them, content in ``content_format``.

    'string' joins text parts with newlines (as upstream); 'openai' gives every message a
    list of ``{"type": "text", "text": ...}`` parts. Non-text parts are refused: this
    engine runs text-only models.
    """
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', got "
                f"{type(message).__name__}."
            )
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(
                f"messages[{i}] needs a 'role' string, got keys {sorted(message)}."
            )
        texts = _text_parts(message.get("content"), i)
        content: Any = "\n".join(texts)
        if content_format == "openai":
            content = [{"type": "text", "text": t} for t in texts]
        out: dict[str, Any] = {"role": message["role"], "content": content}
        for key in _PASSTHROUGH_FIELDS:
            if message.get(key) is not None:
                out[key] = message[key]
        conversation.append(out)
    return conversation


def apply_hf_chat_template(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """The conversation rendered as prompt text by the tokenizer's ``apply_chat_template``.

    The text carries the template's own special tokens (BOS and the like): encode it with
    ``add_special_tokens=False``. ``kwargs`` reach the template as variables.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError(
            "add_generation_prompt and continue_final_message cannot both be true: the first "
            "opens a new assistant turn, the second continues the last message. Pass "
            "add_generation_prompt=False to continue the final message.",
            param="continue_final_message",
        )
    if continue_final_message and not conversation:
        raise ChatTemplateError("continue_final_message needs at least one message.")
    try:
        return tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            tokenize=False,
            **kwargs,
        )
    except Exception as e:  # a template's own raise_exception(), a bad kwarg
        raise ChatTemplateError(f"The chat template failed: {e}") from e
