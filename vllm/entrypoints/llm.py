"""The offline ``LLM`` API."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine
from vllm.entrypoints.chat_utils import (
    ChatCompletionMessageParam,
    ChatTemplateContentFormatOption,
    apply_hf_chat_template,
    parse_chat_messages,
    resolve_chat_template_content_format,
)
from vllm.inputs import PromptType as _InputPrompt
from vllm.inputs import TokensPrompt
from vllm.logger import init_logger
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

logger = init_logger(__name__)

# vllm.inputs' prompt types, plus a bare list of token ids.
PromptType = _InputPrompt | list[int]


def _final_only(params: SamplingParams) -> SamplingParams:
    """A copy of ``params`` whose requests report only when they finish (all generate needs)."""
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


class LLM:
    """An LLM for offline generation: ``LLM(model=dir).generate(prompts, sampling_params)``.

    Takes every ``EngineArgs`` field as a keyword argument; unknown names raise ``TypeError``.
    """

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(
                f"LLM() got unexpected keyword argument(s): {', '.join(unknown)}. "
                "Valid arguments are the EngineArgs fields (see `vllm serve --help`)."
            )
        self.engine_args = EngineArgs(model=model, tokenizer=tokenizer, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()
        self.default_sampling_params: dict[str, Any] | None = None

    def get_tokenizer(self, lora_request: Any = None):
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the defaults the model's creator recommends in its
        generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens as max_tokens), as upstream; plain ``SamplingParams()`` without one or
        with ``generation_config="vllm"``. ``generate`` and ``chat`` use it when given none.
        """
        if self.default_sampling_params is None:
            self.default_sampling_params = self.llm_engine.get_diff_sampling_param()
            if self.default_sampling_params:
                logger.info(
                    "Default sampling parameters from the model's generation config: %s "
                    "(pass generation_config='vllm' to use vLLM's own defaults).",
                    self.default_sampling_params,
                )
        return SamplingParams(**self.default_sampling_params)

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. ``priority`` only orders scheduling upstream, which
        cannot change the outputs; it is accepted and ignored."""
        if lora_request is not None:
            raise ValueError(
                "LoRA is not supported by this engine (the base model runs); pass "
                "lora_request=None, or merge the adapter into the weights."
            )
        prompt_list = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [_final_only(sampling_params)] * len(prompt_list)
        else:
            params_list = [_final_only(p) for p in sampling_params]
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"Got {len(params_list)} sampling params for {len(prompt_list)} prompts; "
                    "pass one, or one per prompt."
                )
        request_ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except BaseException:
            # A rejected prompt rejects the call: its batch-mates must not linger in the engine.
            self.llm_engine.abort_request(request_ids)
            raise
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[ChatCompletionMessageParam] | list[list[ChatCompletionMessageParam]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: ChatTemplateContentFormatOption = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages)
        or to a list of conversations, as upstream.

        Each conversation is rendered by the chat template (``chat_template``, else the
        tokenizer's), with ``tools`` and ``chat_template_kwargs`` passed to it, and its
        tokens generated as ``generate`` would. Each output's ``prompt`` is the rendered
        text. ``mm_processor_kwargs`` only concern multi-modal inputs, which this
        text-only engine refuses.
        """
        is_batch = bool(messages) and all(isinstance(m, list) for m in messages)
        conversations = messages if is_batch else [messages]
        tokenizer = self.get_tokenizer()
        content_format = resolve_chat_template_content_format(
            chat_template, tools, chat_template_content_format, tokenizer
        )
        template_kwargs: dict[str, Any] = dict(
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
        )
        template_kwargs.update(chat_template_kwargs or {})
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = apply_hf_chat_template(
                tokenizer, parse_chat_messages(conversation, content_format), **template_kwargs
            )
            # The template writes the special tokens (BOS) itself.
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append(TokensPrompt(prompt=text, prompt_token_ids=ids))
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    @staticmethod
    def _normalize_prompts(prompts) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, numbers.Number) for t in prompts):
            return [prompts]  # one prompt given as token ids (checked by the engine)
        return prompts

    def _run_engine(
        self, request_ids: list[str], use_tqdm: bool | Callable[..., tqdm]
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            bar_cls = use_tqdm if callable(use_tqdm) else tqdm  # upstream takes a tqdm factory
            bar = bar_cls(
                total=len(request_ids),
                desc="Processed prompts",
                dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s",
            )
        in_toks = out_toks = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            in_toks += len(output.prompt_token_ids)
                            out_toks += sum(len(o.token_ids) for o in output.outputs)
                            elapsed = bar.format_dict["elapsed"] or 1e-9
                            bar.postfix = (
                                f"est. speed input: {in_toks / elapsed:.2f} toks/s, "
                                f"output: {out_toks / elapsed:.2f} toks/s"
                            )
                            bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache's blocks that no running request uses."""
        return self.llm_engine.reset_prefix_cache()

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run a worker method on every rank (e.g. ``"save_sharded_state"``)."""
        return self.llm_engine.model_executor.collective_rpc(method, timeout, args, kwargs)

    def save_sharded_state(
        self, path: str, pattern: str | None = None, max_size: int | None = None
    ) -> None:
        """Save every rank's slice of the model to ``path``, to be loaded later with
        ``LLM(model=path, load_format="sharded_state", tensor_parallel_size=<same>)``.

        Copy the model's config and tokenizer files into ``path`` too (the example script
        and ``vllm save-sharded-state`` do that).
        """
        self.llm_engine.model_executor.save_sharded_state(path, pattern, max_size)

    def __del__(self):
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()
