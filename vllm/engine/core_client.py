"""``llm.llm_engine.engine_core``: where upstream's V1 engine exposes the worker calls.

Scripts written for upstream V1 reach the executor through ``engine_core`` (e.g.
``llm.llm_engine.engine_core.save_sharded_state(...)``). Here the engine core and the
executor live in one process, so this client forwards to the executor: the same single
implementation that ``llm_engine.model_executor`` and ``LLM`` use.
"""

from __future__ import annotations

from typing import Any

from vllm.executor.executor_base import ExecutorBase


class EngineCoreClient:
    """The executor calls of upstream's ``EngineCoreClient``."""

    def __init__(self, executor: ExecutorBase) -> None:
        self._executor = executor

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run ``Worker.<method>(*args, **kwargs)`` on every rank; results in rank order."""
        return self._executor.collective_rpc(method, timeout, args, kwargs)

    def save_sharded_state(
        self, path: str, pattern: str | None = None, max_size: int | None = None
    ) -> None:
        """Every rank writes its slice of the model to ``path``, for
        ``load_format="sharded_state"``."""
        self._executor.save_sharded_state(path, pattern, max_size)
