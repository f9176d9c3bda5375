"""Executors run worker methods on every rank; the engine talks to workers only through them."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.sequence import ModelRunnerOutput, SchedulerOutput

logger = init_logger(__name__)


class ExecutorBase(ABC):
    def __init__(self, vllm_config: VllmConfig):
        self.vllm_config = vllm_config
        # Seconds per start-up phase: "workers" (start and join the process group),
        # "load" (weights, slowest rank), "kv_cache" (size agreed and allocated).
        self.startup_times: dict[str, float] = {}
        self._init_executor()
        with self._phase("kv_cache"):
            self._initialize_kv_caches()

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.startup_times[name] = time.perf_counter() - start

    @abstractmethod
    def _init_executor(self) -> None: ...

    @abstractmethod
    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run ``Worker.<method>(*args, **kwargs)`` on every rank; results in rank order."""

    def _initialize_kv_caches(self) -> None:
        """Agree on a KV cache size every rank can hold (the minimum), then allocate it."""
        num_blocks = min(self.collective_rpc("determine_num_available_blocks"))
        cache_config = self.vllm_config.cache_config
        sched = self.vllm_config.scheduler_config
        blocks_per_seq = -(-sched.max_model_len // cache_config.block_size)
        if num_blocks < 1:
            raise ValueError(
                "No space for the KV cache: raise VLLM_CPU_KVCACHE_SPACE (GiB, CPU) or "
                "gpu_memory_utilization (GPU), or use a smaller model."
            )
        if num_blocks < blocks_per_seq:
            logger.warning(
                "The KV cache holds %d tokens, fewer than max_model_len=%d: long sequences "
                "will be rejected. Lower max_model_len or give the cache more memory.",
                num_blocks * cache_config.block_size,
                sched.max_model_len,
            )
        cache_config.num_gpu_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens)",
            num_blocks,
            cache_config.block_size,
            num_blocks * cache_config.block_size,
        )
        self.collective_rpc("initialize_cache", args=(num_blocks,))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", args=(scheduler_output,))[0]

    def save_sharded_state(
        self, path: str, pattern: str | None = None, max_size: int | None = None
    ) -> None:
        """Every rank writes its own slice of the model to ``path`` (load_format="sharded_state").

        ``pattern`` names the files (must contain ``{rank}`` and ``{part}``); ``max_size``
        (bytes) splits each rank's state into several files. A relative ``path`` is the
        caller's: it is resolved here, as worker processes may run in another directory.
        """
        path = os.path.abspath(path)
        self.collective_rpc(
            "save_sharded_state", kwargs=dict(path=path, pattern=pattern, max_size=max_size)
        )

    def check_health(self) -> None:
        """Raise if a worker can no longer run (the engine then fails its requests)."""
        return None

    def shutdown(self) -> None:
        """Release workers; safe to call more than once."""
        return None

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
