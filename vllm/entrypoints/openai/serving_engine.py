"""What the completion, chat and tokenizer endpoints share: the served model names, input
checks with OpenAI-shaped errors, prompt lengths, chat templates and logprob tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from vllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from vllm.entrypoints.chat_utils import (
    ChatTemplateError,
    apply_hf_chat_template,
    parse_chat_messages,
    resolve_chat_template_content_format,
)
from vllm.entrypoints.openai.protocol import ChatMessage, ErrorInfo, ErrorResponse
from vllm.logger import init_logger
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)


class OpenAIError(Exception):
    """An error answered with OpenAI's ``{"error": {...}}`` body and ``status_code``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.response = ErrorResponse(
            error=ErrorInfo(message=message, type=err_type, param=param, code=status_code)
        )


def engine_dead(error: EngineDeadError) -> OpenAIError:
    return OpenAIError(str(error), 503, "ServiceUnavailableError")


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_async_iterators(
    *iterators: RequestStream,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several request streams as they come, each with its stream's index.

    Closing the merged iterator (a client gone) closes every stream, which aborts its
    request in the engine.
    """
    if len(iterators) == 1:
        (it,) = iterators
        try:
            async for item in it:
                yield 0, item
        finally:
            it.close()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def drain(i: int, it: RequestStream) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        # Abort first: under a cancel scope (a client gone) the await below is cancelled too.
        for it in iterators:
            it.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_names: list[str],
        chat_template: str | None = None,
        enable_log_requests: bool = False,
        max_log_len: int | None = None,
    ) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.chat_template = chat_template
        self.enable_log_requests = enable_log_requests
        self.max_log_len = max_log_len
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.model_config.max_model_len

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(
                f"The model {model!r} does not exist; this server serves "
                f"{', '.join(repr(m) for m in self.served_model_names)}.",
                404,
                "NotFoundError",
                "model",
            )

    # ---- prompts --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def max_tokens_for(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The request's max_tokens, or all the room the prompt leaves; 400 if it does not fit."""
        if num_prompt_tokens >= self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {num_prompt_tokens} tokens; shorten the prompt to at most "
                f"{self.max_model_len - 1} tokens.",
                param="prompt",
            )
        if max_tokens is None:
            return self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
                f"the prompt, {max_tokens} in the completion). Reduce the length of the prompt "
                "or max_tokens.",
                param="max_tokens",
            )
        return max_tokens

    @staticmethod
    def sampling_params(request: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return request.to_sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise OpenAIError(str(e)) from e

    def render_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> str:
        """The conversation as text, through the server's or the tokenizer's chat template
        (``vllm.entrypoints.chat_utils``, the same path as ``LLM.chat``)."""
        try:
            content_format = resolve_chat_template_content_format(
                self.chat_template, None, "auto", self.tokenizer
            )
            conversation = parse_chat_messages(
                [m.model_dump(include={"role", "content", "name"}) for m in messages],
                content_format,
            )
            return apply_hf_chat_template(
                self.tokenizer,
                conversation,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
        except ChatTemplateError as e:
            raise OpenAIError(str(e), param=e.param) from e

    def add_requests(
        self, request_id: str, prompts: list[tuple[str | None, list[int]]], params: list[Any]
    ) -> list[RequestStream]:
        """Start one engine request per prompt; all or none (a refused one aborts the rest)."""
        streams: list[RequestStream] = []
        try:
            for i, ((text, token_ids), p) in enumerate(zip(prompts, params)):
                rid = f"{request_id}-{i}"
                prompt = {"prompt": text, "prompt_token_ids": token_ids}
                if self.enable_log_requests:
                    shown = text if text is None else text[: self.max_log_len]
                    logger.info(
                        "Received request %s: prompt %r (%d tokens), params: %s",
                        rid, shown, len(token_ids), p,
                    )  # fmt: skip
                streams.append(self.engine.generate(prompt, p, rid))
        except BaseException as e:
            for stream in streams:
                stream.close()
            if isinstance(e, ValueError):
                raise OpenAIError(str(e)) from e
            raise
        return streams

    # ---- logprobs -------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top_logprobs(self, logprobs: dict[int, Any]) -> list[tuple[str, float]]:
        """(token text, logprob) pairs, most likely first."""
        ranked = sorted(logprobs.items(), key=lambda kv: -kv[1].logprob)
        return [(self.token_text(t), lp.logprob) for t, lp in ranked]
