"""AsyncLLMEngine: the ``LLMEngine`` driven by a background loop, for many concurrent clients.

Everything but the model runs on the event loop's thread: adding and aborting requests,
scheduling, output processing, tokenizing. Only ``execute_model`` (the forward pass and
sampling, which releases the GIL for most of its time) runs in one worker thread, so
while a step computes, the loop serves HTTP: new requests join the batch at the next
step (continuous batching across clients) and the outputs of the last step stream out.

Each request gets a stream of ``RequestOutput``s. A consumer that stops reading (a
client that disconnected) aborts its request, which frees its KV cache blocks. An
error in a step fails every open stream with ``EngineDeadError`` and the engine stays
dead: ``check_health`` raises from then on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine
from vllm.logger import init_logger
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed (or was shut down) and serves no more requests."""


class RequestStream:
    """The outputs of one request, from the engine loop to its consumer.

    Iterate it to the end, or ``close()`` it to abort the request.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        # The engine is done with the request: finished, aborted or failed.
        self.finished = False
        # The consumer got the last item.
        self._exhausted = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        self._exhausted = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it has finished. Synchronous, so that it runs even in
        a ``finally`` of a task that is being cancelled."""
        self._exhausted = True
        if not self.finished:
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


def _make_step_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-step")


class AsyncLLMEngine:
    """Upstream vLLM's async engine interface over this tree's ``LLMEngine``."""

    def __init__(
        self, engine: LLMEngine, step_thread: concurrent.futures.ThreadPoolExecutor | None = None
    ) -> None:
        """``step_thread``: the one-thread pool that runs ``execute_model`` (made if None);
        ``from_engine_args`` builds the engine on it too."""
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        self._has_work = asyncio.Event()
        self._step_thread = step_thread or _make_step_thread()
        self._loop_task: asyncio.Task | None = None
        # Set when the engine failed or was shut down: nothing is served any more.
        self._dead: EngineDeadError | None = None
        # Set when shutdown begins: new requests are refused, open ones are aborted.
        self._refusing: EngineDeadError | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLMEngine:
        """Build the engine on the thread that will run the model.

        The model's CPU ops then run on one OpenMP thread team. Ops on a second thread
        (loading on the main thread, say) would give the process a second team; with more
        OpenMP threads than cores, OpenMP stops spinning at barriers and sleeps, and every
        decode step pays dozens of wake-ups (about a quarter slower on 2 cores).
        """
        step_thread = _make_step_thread()
        engine = step_thread.submit(LLMEngine.from_engine_args, engine_args).result()
        return cls(engine, step_thread)

    # ---- state ----------------------------------------------------------------------------

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why requests are refused (a failure or a shutdown), or None while serving."""
        return self._dead or self._refusing

    @property
    def tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    @property
    def model_config(self):
        return self.engine.model_config

    async def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine cannot serve (a step failed, a worker died,
        or it is shutting down)."""
        if self._dead is None:
            try:
                self.engine.check_health()
            except Exception as e:
                self._die(EngineDeadError(f"The engine is not healthy: {e}"))
        error = self.dead_error
        if error is not None:
            raise error

    # ---- requests -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | dict | list[int],
        sampling_params: SamplingParams,
        request_id: str,
    ) -> RequestStream:
        """Add the request now and return the stream of its outputs.

        Invalid input (a prompt too long, a bad parameter) raises ``ValueError`` here,
        before anything is streamed.
        """
        error = self.dead_error
        if error is not None:
            raise error
        self.start()
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self.engine.add_request(request_id, prompt, sampling_params)
        stream = RequestStream(request_id, self._abort)
        self._streams[request_id] = stream
        self._has_work.set()
        return stream

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache blocks."""
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        # Safe between the halves of a step too: blocks freed now are handed out again
        # only by the next schedule(), after the step in flight has ended.
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
        if self._dead is None:
            self.engine.abort_request(request_id)

    def stop_accepting(self, reason: str) -> None:
        """Refuse new requests and abort every open one; each open stream raises
        ``EngineDeadError(reason)``. The first step of a shutdown."""
        if self._refusing is None:
            self._refusing = EngineDeadError(reason)
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id)
            stream.put(self._refusing)

    # ---- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background loop on the running event loop (idempotent)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self._has_work.clear()
                    await self._has_work.wait()
                    continue
                so = engine.schedule()
                if so is None:
                    await asyncio.sleep(0)
                    continue
                runner_output = await loop.run_in_executor(
                    self._step_thread, engine.execute_model, so
                )
                for output in engine.process_model_output(so, runner_output):
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue  # aborted while the step ran
                    if output.finished:
                        stream.finished = True
                        del self._streams[output.request_id]
                    stream.put(output)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            logger.exception("The engine loop failed; failing every open request.")
            self._die(EngineDeadError(f"The engine failed: {type(e).__name__}: {e}"))

    def _die(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        for stream in self._streams.values():
            stream.finished = True
            stream.put(self._dead)
        self._streams.clear()

    async def shutdown(self) -> None:
        """Abort open requests, stop the loop, then the workers. Safe to call twice."""
        self.stop_accepting("The server is shutting down.")
        if self._dead is None:
            self._dead = EngineDeadError("The engine was shut down.")
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # A step already in the thread finishes before its workers go.
        await asyncio.get_running_loop().run_in_executor(None, self._step_thread.shutdown)
        self.engine.shutdown()
