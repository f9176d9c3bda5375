"""LLMEngine: tokenizer + scheduler + executor, advanced one step at a time."""

from __future__ import annotations

import itertools
import json
import operator
import os
import time
from typing import Any

from vllm.config import ModelConfig, VllmConfig
from vllm.core.scheduler import Scheduler
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.core_client import EngineCoreClient
from vllm.engine.detokenizer import Detokenizer
from vllm.engine.metrics_types import IterationStats, RequestStateStats, StatLoggerBase
from vllm.engine.output_processor import OutputProcessor, RequestState
from vllm.executor.executor_base import ExecutorBase
from vllm.inputs import check_prompt_dict
from vllm.logger import init_logger
from vllm.outputs import RequestMetrics, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.sequence import ModelRunnerOutput, SchedulerOutput, Sequence
from vllm.transformers_utils.gguf_utils import gguf_generation_config, gguf_location, is_gguf

logger = init_logger(__name__)


def _token_ids(ids: Any) -> list[int]:
    """Prompt token ids as a list of ints; numpy integers are taken, anything else is not."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"Prompt token ids must be a list of integers, got {ids!r:.50}.")
    out = []
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            out.append(operator.index(t))  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise ValueError(
                f"Prompt token ids must be integers; item {i} is {t!r} ({type(t).__name__})."
            ) from None
    return out


def get_executor_class(vllm_config: VllmConfig) -> type[ExecutorBase]:
    backend = vllm_config.parallel_config.distributed_executor_backend
    if backend == "uni":
        if vllm_config.parallel_config.world_size != 1:
            raise ValueError(
                "distributed_executor_backend='uni' runs one process; use 'mp' for "
                f"tensor_parallel_size={vllm_config.parallel_config.tensor_parallel_size}."
            )
        from vllm.executor.uniproc_executor import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from vllm.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor
    from vllm.executor.ray_executor import RayExecutor

    return RayExecutor


def _load_generation_config(model_config: ModelConfig) -> dict[str, Any]:
    """The generation config: eos ids for every request, sampling defaults for
    ``get_diff_sampling_param``. From the model's generation_config.json, or from the
    directory ``--generation-config`` names."""
    model_dir = model_config.model
    if model_config.generation_config not in ("auto", "vllm"):
        model_dir = model_config.generation_config
    elif is_gguf(model_config.model):  # a file, no directory: the ids its metadata gives
        return gguf_generation_config(model_config.hf_config)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


class LLMEngine:
    def __init__(
        self, vllm_config: VllmConfig, executor_class: type[ExecutorBase], log_stats: bool = True
    ):
        start = time.perf_counter()
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.log_stats = log_stats
        self.tokenizer = self._init_tokenizer()
        self.detokenizer = Detokenizer(self.tokenizer)
        self.generation_config = _load_generation_config(self.model_config)
        tokenizer_s = time.perf_counter() - start
        self.model_executor = executor_class(vllm_config)
        self.engine_core = EngineCoreClient(self.model_executor)
        self.scheduler = Scheduler(vllm_config.scheduler_config, vllm_config.cache_config)
        self.output_processor = OutputProcessor(
            self.detokenizer, self.scheduler, self.model_config.max_model_len
        )
        self.requests: dict[str, RequestState] = {}
        self._seq_counter = itertools.count()
        self.stat_loggers: list[StatLoggerBase] = []
        # Seconds per start-up phase (from_engine_args adds "config"); logged once ready.
        self.startup_times = {"tokenizer": tokenizer_s, **self.model_executor.startup_times}
        self.startup_times["total"] = time.perf_counter() - start

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        start = time.perf_counter()
        config = engine_args.create_engine_config()
        config_s = time.perf_counter() - start
        engine = cls(
            config, get_executor_class(config), log_stats=not engine_args.disable_log_stats
        )
        times = engine.startup_times
        times["config"] = config_s
        times["total"] += config_s
        logger.info(
            "Engine ready in %.2f s (config %.2f s, tokenizer %.2f s, workers %.2f s, "
            "weights %.2f s, KV cache %.2f s)",
            *(times.get(k, 0.0) for k in ("total", "config", "tokenizer", "workers", "load",
                                          "kv_cache")),
        )  # fmt: skip
        return engine

    def _init_tokenizer(self):
        from transformers import AutoTokenizer

        mc = self.model_config
        path, kwargs = mc.tokenizer, {}
        if is_gguf(path):  # the GGUF's own tokenizer, its chat template included
            path, kwargs = gguf_location(path)
        try:
            return AutoTokenizer.from_pretrained(
                path,
                trust_remote_code=mc.trust_remote_code,
                use_fast=mc.tokenizer_mode != "slow",
                **kwargs,
            )
        except Exception as e:
            raise ValueError(
                f"Could not load a tokenizer from {mc.tokenizer!r}: {e}. Pass tokenizer=<dir> "
                "pointing at a directory with tokenizer files."
            ) from e

    def get_tokenizer(self):
        return self.tokenizer

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """SamplingParams fields the model's generation config recommends (upstream's
        ``ModelConfig.get_diff_sampling_param``); none with ``generation_config='vllm'``."""
        config = {} if self.model_config.generation_config == "vllm" else self.generation_config
        config = {**config, **self.model_config.override_generation_config}
        keys = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
        params = {k: config[k] for k in keys if config.get(k) is not None}
        if "max_new_tokens" in params:  # Hugging Face's name for max_tokens
            params["max_tokens"] = params.pop("max_new_tokens")
        return params

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | dict | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        text, token_ids = self._tokenize(prompt)
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("The prompt is empty; give at least one token.")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"The prompt ({len(token_ids)} tokens) is too long for max_model_len={max_len}: "
                "it must leave room for at least one generated token."
            )
        cache = self.vllm_config.cache_config
        needed = min(max_len, len(token_ids) + (params.max_tokens or max_len))
        if -(-needed // cache.block_size) > cache.num_gpu_blocks:
            raise ValueError(
                f"A sequence of {needed} tokens does not fit in the KV cache "
                f"({cache.num_gpu_blocks * cache.block_size} tokens); lower max_tokens or "
                "give the cache more memory."
            )
        max_logprobs = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > max_logprobs:
                raise ValueError(
                    f"Requested {name}={k}, more than max_logprobs={max_logprobs}; ask for "
                    "fewer or raise max_logprobs when creating the engine."
                )
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        params = params.clone()
        params.update_from_generation_config(self.generation_config, self.tokenizer.eos_token_id)
        # arrival_time is wall-clock (time.time()), as upstream; the stats use monotonic.
        wall, now = time.time(), time.monotonic()
        if arrival_time is not None:
            now -= max(0.0, wall - arrival_time)
            wall = arrival_time
        seqs = [
            Sequence(next(self._seq_counter), request_id, token_ids, p, now, index=i)
            for i, p in enumerate(self._per_sample_params(params))
        ]
        for seq in seqs:
            self.scheduler.add_seq(seq)
        self.requests[request_id] = RequestState(
            request_id,
            text,
            token_ids,
            seqs,
            params,
            RequestStateStats(arrival_time=now, num_prompt_tokens=len(token_ids)),
            RequestMetrics(arrival_time=wall, last_token_time=wall),
            [None] * len(token_ids) if params.prompt_logprobs is not None else None,
        )
        self._record_stats(None)

    @staticmethod
    def _per_sample_params(params: SamplingParams) -> list[SamplingParams]:
        """Params of each of the ``n`` samples; with a seed, sample i uses ``seed + i``
        (as upstream) so the n completions differ yet stay reproducible."""
        if params.seed is None or params.n == 1:
            return [params] * params.n
        per_sample = [params.clone() for _ in range(params.n)]
        for i, p in enumerate(per_sample):
            p.seed = params.seed + i
        return per_sample

    def _tokenize(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            check_prompt_dict(prompt)
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(
                f"A dict prompt needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}."
            )
        if isinstance(prompt, (list, tuple)):
            return None, _token_ids(prompt)
        raise TypeError(
            f"Unsupported prompt {prompt!r:.50} of type {type(prompt).__name__}: use a string, "
            "a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'."
        )

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        stats = IterationStats() if self.stat_loggers else None
        now = time.monotonic()
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.scheduler.abort_request(rid)
                if stats is not None:
                    stats.update_from_finished(req.stats, "abort", now)
        self._record_stats(stats)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> bool:
        """Forget the cached KV blocks no running request uses (as upstream, True when
        done)."""
        self.scheduler.reset_prefix_cache()
        return True

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of requests that progressed.

        A request whose ``output_kind`` is FINAL_ONLY has an output only when it finishes.
        """
        so = self.schedule()
        if so is None:
            return []
        return self.process_model_output(so, self.execute_model(so))

    # The three parts of a step, for engines that run the model elsewhere (AsyncLLMEngine
    # runs execute_model in a thread). Requests may be added or aborted between them.

    def schedule(self) -> SchedulerOutput | None:
        """This step's batch, or None when there is nothing to run."""
        so = self.scheduler.schedule()
        if so.is_empty:
            if self.scheduler.has_unfinished_seqs():
                raise RuntimeError("The scheduler could not schedule any work; this is a bug.")
            return None
        now = time.time()
        for new in so.new_seqs:
            req = self.requests[self.scheduler.seqs[new.seq_id].request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.time_in_queue = now - req.metrics.arrival_time
                req.num_cached_tokens = new.num_computed_tokens
        return so

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_executor.execute_model(scheduler_output)

    def process_model_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestOutput]:
        processor = self.output_processor
        for chunk in runner_output.prompt_logprobs:
            seq = self.scheduler.seqs.get(chunk.seq_id)
            req = self.requests.get(seq.request_id) if seq is not None else None
            if req is not None:
                processor.process_prompt_logprobs(req, chunk)
        touched: dict[str, RequestState] = {}
        wall = time.time()
        for seq, sampled in self.scheduler.update_from_output(scheduler_output, runner_output):
            processor.process_token(seq, sampled)
            req = touched[seq.request_id] = self.requests[seq.request_id]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = wall
            req.metrics.last_token_time = wall
        now = time.monotonic()
        stats = IterationStats() if self.stat_loggers else None
        outputs = []
        for req in touched.values():
            finished = all(s.is_finished for s in req.seqs)
            if stats is not None:
                num_output_tokens = sum(s.num_output_tokens for s in req.seqs)
                stats.update_from_output(req.stats, num_output_tokens, now)
                if finished:
                    reason = req.seqs[0].status.finish_reason or "abort"
                    stats.update_from_finished(req.stats, reason, now)
            if finished:
                req.metrics.finished_time = wall
            if finished or req.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(processor.make_output(req, finished))
            if finished:
                del self.requests[req.request_id]
        if stats is not None:
            self._record_stats(stats)
        return outputs

    # ---- stats ----------------------------------------------------------------------------

    def add_logger(self, stat_logger: StatLoggerBase) -> None:
        """Have ``stat_logger.record`` called after every step and request change."""
        self.stat_loggers.append(stat_logger)

    def _record_stats(self, iteration_stats: IterationStats | None) -> None:
        if not self.stat_loggers:
            return
        scheduler_stats = self.scheduler.get_stats()
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration_stats)

    def check_health(self) -> None:
        """Raise if the engine can no longer run steps (e.g. a worker process died)."""
        self.model_executor.check_health()

    def shutdown(self) -> None:
        executor = getattr(self, "model_executor", None)
        if executor is not None:
            executor.shutdown()
