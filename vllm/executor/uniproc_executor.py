"""TP size 1: the single worker lives in the engine's process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.executor.executor_base import ExecutorBase
from vllm.worker.worker import Worker


class UniProcExecutor(ExecutorBase):
    def _init_executor(self) -> None:
        with self._phase("workers"):
            self.driver_worker = Worker(self.vllm_config, rank=0)
            self.driver_worker.init_device()
        with self._phase("load"):
            self.driver_worker.load_model()

    def collective_rpc(
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """A method name runs ``worker.<method>(...)``; a function runs ``fn(worker, ...)``."""
        if callable(method):
            return [method(self.driver_worker, *args, **(kwargs or {}))]
        return [getattr(self.driver_worker, method)(*args, **(kwargs or {}))]

    def shutdown(self) -> None:
        self.driver_worker = None
