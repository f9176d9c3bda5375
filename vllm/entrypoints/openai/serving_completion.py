"""``POST /v1/completions``: one engine request per prompt, ``n`` choices each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from vllm.engine.async_llm_engine import EngineDeadError, RequestStream
from vllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
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
from vllm.outputs import CompletionOutput, Logprob, RequestOutput

Prompt = tuple[str | None, list[int]]


def _num_prompt_tokens(prompts: list[Prompt]) -> int:
    return sum(len(ids) for _, ids in prompts)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(
        self, request: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        """The response, or (``stream``) the server-sent events to send."""
        self.check_model(request.model)
        self._check_supported(request)
        prompts = self._parse_prompts(request.prompt)
        params = [
            self.sampling_params(
                request, self.max_tokens_for(len(ids), request.max_tokens), request.logprobs
            )
            for _, ids in prompts
        ]
        if request.echo and request.logprobs is not None:
            for p in params:  # the echoed prompt comes with its tokens' logprobs
                p.prompt_logprobs = request.logprobs
        request_id = f"cmpl-{random_uuid()}"
        streams = self.add_requests(request_id, prompts, params)
        if request.stream:
            return self._stream(request, request_id, prompts, streams)
        return await self._collect(request, request_id, prompts, streams)

    @staticmethod
    def _check_supported(request: CompletionRequest) -> None:
        unsupported = {
            "suffix": request.suffix is not None,
            "logit_bias": bool(request.logit_bias),
            "best_of": request.best_of not in (None, request.n),
        }
        for field, given in unsupported.items():
            if given:
                raise OpenAIError(f"{field} is not supported by this server.", param=field)
        if request.stream_options is not None and not request.stream:
            raise OpenAIError(
                "stream_options is only allowed with stream=true.", param="stream_options"
            )

    def _parse_prompts(self, prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt is empty; give a string or token ids.", param="prompt")
        if all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        return [(p, self.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]

    def _prefix(self, request: CompletionRequest, prompt: Prompt) -> str:
        """What ``echo`` puts before the completion: the prompt's text."""
        if not request.echo:
            return ""
        text, ids = prompt
        return text if text is not None else self.tokenizer.decode(ids)

    def _logprobs(
        self, out: CompletionOutput, text_offset: int, echoed: RequestOutput | None = None
    ) -> CompletionLogProbs | None:
        """OpenAI's logprobs of the choice's tokens, after those of the prompt of
        ``echoed`` if given (its first token has none: null)."""
        if out.logprobs is None:
            return None
        result = CompletionLogProbs()
        if echoed is not None and echoed.prompt_logprobs is not None:
            pairs = zip(echoed.prompt_token_ids, echoed.prompt_logprobs)
            text_offset = self._add_logprobs(result, pairs, text_offset)
        self._add_logprobs(result, zip(out.token_ids, out.logprobs), text_offset)
        return result

    def _add_logprobs(
        self,
        result: CompletionLogProbs,
        pairs: Iterable[tuple[int, dict[int, Logprob] | None]],
        text_offset: int,
    ) -> int:
        for token_id, top in pairs:
            token = self.token_text(token_id)
            result.tokens.append(token)
            result.text_offset.append(text_offset)
            text_offset += len(token)
            if top is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(top[token_id].logprob)
            ranked: dict[str, float] = {}
            for text, logprob in self.top_logprobs(top):
                ranked.setdefault(text, logprob)  # tokens of the same text: the likeliest
            result.top_logprobs.append(ranked)
        return text_offset

    async def _collect(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[Prompt],
        streams: list[RequestStream],
    ) -> CompletionResponse:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, output in merge_async_iterators(*streams):
            finals[i] = output
        choices = []
        completion_tokens = 0
        for i, final in enumerate(finals):
            assert final is not None
            prefix = self._prefix(request, prompts[i])
            for out in final.outputs:
                completion_tokens += len(out.token_ids)
                choices.append(
                    CompletionResponseChoice(
                        index=i * request.n + out.index,
                        text=prefix + out.text,
                        logprobs=self._logprobs(out, 0, final if request.echo else None),
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                    )
                )
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo.of(_num_prompt_tokens(prompts), completion_tokens),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[Prompt],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        # Per choice: characters sent so far (logprob text offsets); None before the first.
        sent_chars: list[int | None] = [None] * (len(prompts) * n)
        first_outputs: list[RequestOutput | None] = [None] * len(prompts)
        completion_tokens = 0
        try:
            async for i, output in merge_async_iterators(*streams):
                for out in output.outputs:
                    index = i * n + out.index
                    # One chunk per output, which has new tokens even where their text is
                    # not settled yet (an unfinished character): clients count tokens.
                    sent = sent_chars[index]
                    if output.prompt_logprobs is not None:  # in a request's first output
                        first_outputs[i] = output
                    # The prompt's logprobs go with each choice's first chunk.
                    echoed = first_outputs[i] if request.echo and sent is None else None
                    # echo puts the prompt before a choice's first chunk.
                    text = (self._prefix(request, prompts[i]) if sent is None else "") + out.text
                    sent = sent or 0
                    completion_tokens += len(out.token_ids)
                    chunk = CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[
                            CompletionResponseChoice(
                                index=index,
                                text=text,
                                logprobs=self._logprobs(out, sent, echoed),
                                finish_reason=out.finish_reason,
                                stop_reason=out.stop_reason,
                            )
                        ],
                    )
                    sent_chars[index] = sent + len(text)
                    yield sse(chunk)
            if request.include_usage_in_stream:
                usage = UsageInfo.of(_num_prompt_tokens(prompts), completion_tokens)
                yield sse(
                    CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=usage,
                    )
                )
        except EngineDeadError as e:
            yield sse(engine_dead(e).response)
        yield SSE_DONE
