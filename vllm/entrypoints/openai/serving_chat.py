"""``POST /v1/chat/completions``: the conversation rendered with the chat template, then
generated like a completion."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from vllm.engine.async_llm_engine import EngineDeadError, RequestStream
from vllm.entrypoints.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    random_uuid,
)
from vllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIError,
    OpenAIServing,
    engine_dead,
    merge_async_iterators,
    sse,
)
from vllm.outputs import CompletionOutput


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, response_role: str = "assistant", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.response_role = response_role

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """The response, or (``stream``) the server-sent events to send."""
        self.check_model(request.model)
        for field in ("tools", "logit_bias"):
            if getattr(request, field):
                raise OpenAIError(f"{field} is not supported by this server.", param=field)
        if request.stream_options is not None and not request.stream:
            raise OpenAIError(
                "stream_options is only allowed with stream=true.", param="stream_options"
            )
        text = self.render_chat(
            request.messages,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
        )
        # The template writes the special tokens (BOS) itself.
        token_ids = self.encode(text, add_special_tokens=False)
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if not request.logprobs and request.top_logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true.", param="top_logprobs")
        params = self.sampling_params(
            request, self.max_tokens_for(len(token_ids), max_tokens), logprobs
        )
        request_id = f"chatcmpl-{random_uuid()}"
        (stream,) = self.add_requests(request_id, [(text, token_ids)], [params])
        if request.stream:
            return self._stream(request, request_id, len(token_ids), stream)
        return await self._collect(request, request_id, len(token_ids), stream)

    def _echo(self, request: ChatCompletionRequest) -> str:
        """With ``echo``, the last message's content goes before the reply (as upstream)."""
        if not request.echo or not request.messages:
            return ""
        last = request.messages[-1]
        return last.content if isinstance(last.content, str) else ""

    def _logprobs(self, out: CompletionOutput, top_k: int) -> ChatCompletionLogProbs | None:
        """OpenAI's chat logprobs: each token's, and exactly the ``top_k`` likeliest."""
        if out.logprobs is None:
            return None
        content = []
        for token_id, top in zip(out.token_ids, out.logprobs):
            token = self.token_text(token_id)
            content.append(
                ChatLogProbsContent(
                    token=token,
                    logprob=top[token_id].logprob,
                    bytes=list(token.encode("utf-8", errors="replace")),
                    top_logprobs=[
                        ChatLogProb(
                            token=t, logprob=lp, bytes=list(t.encode("utf-8", errors="replace"))
                        )
                        for t, lp in self.top_logprobs(top)[:top_k]
                    ],
                )
            )
        return ChatCompletionLogProbs(content=content)

    async def _collect(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        num_prompt_tokens: int,
        stream: RequestStream,
    ) -> ChatCompletionResponse:
        final = None
        async for _, output in merge_async_iterators(stream):
            final = output
        assert final is not None
        echo = self._echo(request)
        choices = [
            ChatCompletionResponseChoice(
                index=out.index,
                message=ChatResponseMessage(role=self.response_role, content=echo + out.text),
                logprobs=self._logprobs(out, request.top_logprobs or 0),
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
            for out in final.outputs
        ]
        completion_tokens = sum(len(out.token_ids) for out in final.outputs)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo.of(num_prompt_tokens, completion_tokens),
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        num_prompt_tokens: int,
        stream: RequestStream,
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choice: ChatCompletionResponseStreamChoice) -> str:
            return sse(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[choice]
                )
            )

        completion_tokens = 0
        try:
            # Each choice opens with the role (and, with echo, the last message), as OpenAI.
            echo = self._echo(request)
            for index in range(request.n):
                delta = DeltaMessage(role=self.response_role, content=echo)
                yield chunk(ChatCompletionResponseStreamChoice(index=index, delta=delta))
            async for _, output in merge_async_iterators(stream):
                for out in output.outputs:
                    # One chunk per output, which has new tokens even where their text is
                    # not settled yet (an unfinished character): clients count tokens.
                    completion_tokens += len(out.token_ids)
                    yield chunk(
                        ChatCompletionResponseStreamChoice(
                            index=out.index,
                            delta=DeltaMessage(content=out.text),
                            logprobs=self._logprobs(out, request.top_logprobs or 0),
                            finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason,
                        )
                    )
            if request.include_usage_in_stream:
                usage = UsageInfo.of(num_prompt_tokens, completion_tokens)
                yield sse(
                    ChatCompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=usage,
                    )
                )
        except EngineDeadError as e:
            yield sse(engine_dead(e).response)
        finally:
            stream.close()  # also when the client left before the first output
        yield SSE_DONE
