"""Tensor parallelism on one machine: one spawned process per rank, driven over pipes.

Every rank (rank 0, the driver that samples, included) runs ``_worker_main`` in a
process started with ``spawn``: it builds a ``Worker`` and answers calls that arrive on
its end of a ``multiprocessing`` Pipe. A call is ``call id + pickle((method, args,
kwargs))``; the answer is ``pickle((call id, ok, result or (exception, traceback)))``.
Pipes carry messages of any size; tensors between ranks go through torch.distributed
(gloo on CPU, nccl on CUDA) on a TCP port picked free at start-up.

The executor waits on the pipes and the process sentinels together, so a rank that
dies is seen at once: the other ranks, which may be blocked in a collective waiting
for it, are killed, and the caller gets an error naming the rank and the cause.
Workers also exit on their own when the engine's process goes away.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from vllm.config import VllmConfig
from vllm.executor.executor_base import ExecutorBase
from vllm.logger import init_logger
from vllm.sequence import ModelRunnerOutput, SchedulerOutput
from vllm.utils import get_open_port

logger = init_logger(__name__)

# After one rank raised, how long the others get to answer before they are presumed
# stuck in a collective that waits for the failed rank (and are killed).
ERROR_GRACE_S = 5.0
# How long a worker gets to exit after being asked to before it is killed.
JOIN_TIMEOUT_S = 5.0
# How often a worker checks that the engine's process is still its parent.
PARENT_POLL_S = 1.0
# How many times start-up is retried when the rendezvous port was taken meanwhile.
PORT_ATTEMPTS = 3
# How long one engine step may take before the workers are looked at: one that the OS
# reports stopped or stuck (SIGSTOP, a hang in the kernel) fails the step and all are
# stopped; while all are still working, the step goes on. Upstream's variable name.
EXECUTE_MODEL_TIMEOUT_ENV = "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"
EXECUTE_MODEL_TIMEOUT_S = 30.0
_MAX_WAIT_S = 1e6  # multiprocessing's wait() takes no larger timeout
# psutil states of a process that is not going to answer.
_STUCK_STATES = frozenset({"stopped", "tracing-stop", "disk-sleep", "zombie", "dead", "gone"})


def execute_model_timeout() -> float | None:
    """The step bound in seconds (None: 'inf', no bound)."""
    value = os.environ.get(EXECUTE_MODEL_TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else EXECUTE_MODEL_TIMEOUT_S
    except ValueError:
        timeout = float("nan")
    if not timeout > 0:
        raise ValueError(
            f"{EXECUTE_MODEL_TIMEOUT_ENV}={value!r} is not a number of seconds; give a "
            f"positive number, e.g. {EXECUTE_MODEL_TIMEOUT_S:g}, or 'inf' for no bound."
        )
    return None if timeout == float("inf") else min(timeout, _MAX_WAIT_S)


_HEADER = struct.Struct("<q")  # call id in front of each request
_SHUTDOWN_ID = -1  # a request with this id asks the worker to exit
_FATAL_ID = -2  # a reply with this id: the worker failed outside any call and exits


@dataclass
class WorkerProcHandle:
    """The engine's side of one rank: its process and its end of the control pipe."""

    rank: int
    proc: BaseProcess
    conn: Connection

    @property
    def pid(self) -> int | None:
        return self.proc.pid


class MultiprocExecutor(ExecutorBase):
    """One worker process per tensor-parallel rank; ``collective_rpc`` drives them all."""

    def __init__(self, vllm_config: VllmConfig):
        self.workers: list[WorkerProcHandle] = []
        self.distributed_init_method: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed: str | None = None  # why the executor can no longer be used
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # one call at a time: replies come back in order
        self.execute_model_timeout = execute_model_timeout()
        try:
            super().__init__(vllm_config)
        except BaseException:
            self.shutdown()
            raise

    def _init_executor(self) -> None:
        world_size = self.vllm_config.parallel_config.world_size
        if self.vllm_config.device_config.device == "cuda":
            import torch

            if torch.cuda.device_count() < world_size:
                raise ValueError(
                    f"tensor_parallel_size={world_size} needs {world_size} GPUs (one per "
                    f"rank); {torch.cuda.device_count()} are visible. Use at most "
                    f"{torch.cuda.device_count()} or set CUDA_VISIBLE_DEVICES."
                )
        with self._phase("workers"):
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self.distributed_init_method = f"tcp://127.0.0.1:{get_open_port()}"
                self._start_workers(world_size)
                try:
                    self.collective_rpc("init_device")
                    break
                except Exception as e:
                    if attempt == PORT_ATTEMPTS or not _port_was_taken(e):
                        raise
                    logger.warning("Rendezvous port was taken by another process; retrying.")
                    self._stop(graceful=False)
                    self._closed = None
        with self._phase("load"):
            self.collective_rpc("load_model")

    def _start_workers(self, world_size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        worker_config = copy.copy(self.vllm_config)
        worker_config.model_config = copy.copy(self.vllm_config.model_config)
        worker_config.model_config.hf_config = _ConfigSnapshot(worker_config.model_config.hf_config)
        self.workers = []
        # Registered before the first start so that any exit path stops what was started.
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, True)
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                name=f"VllmWorker-{rank}",
                args=(worker_config, rank, self.distributed_init_method, child_conn, os.getpid()),
                daemon=True,
            )
            proc.start()
            child_conn.close()  # the child's copy is enough; EOF then means the child is gone
            self.workers.append(WorkerProcHandle(rank, proc, parent_conn))
        logger.info(
            "Started %d worker processes (pids %s); rendezvous at %s",
            world_size,
            ", ".join(str(w.pid) for w in self.workers),
            self.distributed_init_method,
        )

    # ---- calls ----------------------------------------------------------------------------

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run ``Worker.<method>(*args, **kwargs)`` (or ``method(worker, ...)`` for a
        module-level function) on every rank; results in rank order.

        Raises the workers' exception (with their traceback as a note) when every rank
        answered; RuntimeError naming the rank and cause when a worker died, after which
        the executor is unusable; TimeoutError after ``timeout`` seconds.
        """
        return self._call(method, timeout, args, kwargs)

    def _call(
        self,
        method: str | Callable[..., Any],
        timeout: float | None,
        args: tuple,
        kwargs: dict[str, Any] | None,
        patient: bool = False,
    ) -> list[Any]:
        if self._closed is not None:
            raise RuntimeError(f"The workers are no longer running ({self._closed}).")
        try:
            payload = pickle.dumps((method, tuple(args), dict(kwargs or {})))
        except Exception as e:
            raise TypeError(
                f"Cannot send {method!r} to the workers: it or its arguments do not pickle "
                f"({e}). Pass a method name or a module-level function."
            ) from e
        with self._lock:
            call_id = next(self._call_ids)
            message = _HEADER.pack(call_id) + payload
            try:
                for w in self.workers:
                    with contextlib.suppress(OSError):  # a dead worker is reported by _collect
                        w.conn.send_bytes(message)
            except BaseException:
                # Some ranks got the call and others not: they would wait for each other.
                self._fail("interrupted while sending a call to the workers")
                raise
            return self._collect(call_id, method, timeout, patient)

    def _collect(
        self, call_id: int, method: Any, timeout: float | None, patient: bool = False
    ) -> list[Any]:
        """``patient``: past ``timeout``, keep waiting while every pending rank's process
        is still working; give up only once one is stopped or stuck."""
        name = getattr(method, "__name__", method)
        results: dict[int, Any] = {}
        errors: dict[int, tuple[BaseException, str]] = {}
        deaths: dict[int, str] = {}
        pending = {w.rank: w for w in self.workers}
        deadline = None if timeout is None else time.monotonic() + timeout
        grace_end = None
        while pending and not deaths:
            ends = [t for t in (deadline, grace_end) if t is not None]
            remaining = max(0.0, min(ends) - time.monotonic()) if ends else None
            waitables = [w.conn for w in pending.values()] + [w.proc.sentinel for w in self.workers]
            ready = wait(waitables, remaining)
            if not ready and patient and deadline is not None and time.monotonic() >= deadline:
                if not any(_process_state(w.pid) in _STUCK_STATES for w in pending.values()):
                    logger.warning(
                        "%r has run for over %g s more on ranks %s, which are still working.",
                        getattr(method, "__name__", method), timeout, sorted(pending),
                    )  # fmt: skip
                    deadline = time.monotonic() + (timeout or 0)
                    continue
            if not ready:
                break
            for w in list(pending.values()):
                if w.conn not in ready:
                    continue
                try:
                    data = w.conn.recv_bytes()
                except (EOFError, OSError):
                    continue  # the pipe closed: the process is gone, its sentinel says how
                try:
                    reply_id, ok, value = pickle.loads(data)
                except Exception as e:  # e.g. an exception class this process cannot import
                    reply_id, ok = call_id, False
                    value = (RuntimeError(f"Unreadable reply from worker rank {w.rank}: {e}"), "")
                if reply_id not in (call_id, _FATAL_ID):
                    continue  # the late answer to a call that timed out
                del pending[w.rank]
                if ok:
                    results[w.rank] = value
                else:
                    errors[w.rank] = value
                    grace_end = grace_end or time.monotonic() + ERROR_GRACE_S
            for w in self.workers:
                if w.proc.sentinel in ready or (w.rank in pending and not w.proc.is_alive()):
                    deaths[w.rank] = self._death_cause(w)
        if deaths:
            rank = min(deaths)
            msg = f"Worker rank {rank} {deaths[rank]} while running {name!r}."
            msg += "".join(f" Worker rank {r} {c}." for r, c in sorted(deaths.items()) if r != rank)
            for r, (exc, tb) in sorted(errors.items()):
                msg += f"\nWorker rank {r} raised {type(exc).__name__}: {exc}\n{tb}"
            msg += "\nThe other workers were stopped; create a new LLM to continue."
            self._fail(f"worker rank {rank} {deaths[rank]}")
            raise RuntimeError(msg)
        if errors:
            rank = min(errors)
            exc, tb = errors[rank]
            if pending:  # those ranks are presumably blocked in a collective
                self._fail(f"worker rank {rank} raised in {name!r}")
                tb += (
                    f"\nRanks {sorted(pending)} did not answer within {ERROR_GRACE_S:g} s and "
                    "were stopped; create a new LLM to continue."
                )
            if hasattr(exc, "add_note"):
                exc.add_note(f"Raised in worker rank {rank} running {name!r}; its traceback:\n{tb}")
                raise exc
            raise RuntimeError(f"Worker rank {rank} raised in {name!r}:\n{tb}") from exc
        if pending:
            states = "; ".join(
                f"rank {w.rank} (pid {w.pid}) is {_process_state(w.pid)}"
                for w in sorted(pending.values(), key=lambda w: w.rank)
            )
            raise TimeoutError(f"{name!r} did not finish within {timeout:g} s: {states}.")
        return [results[w.rank] for w in self.workers]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One step. Past the step bound, a worker the OS reports stopped or stuck fails
        the step and all workers are stopped (the others wait for it in a collective)."""
        timeout = self.execute_model_timeout
        try:
            return self._call("execute_model", timeout, (scheduler_output,), None, True)[0]
        except TimeoutError as e:
            self._fail(f"a step took longer than {timeout:g} s and a worker stopped answering")
            raise TimeoutError(
                f"{e} The workers were stopped; create a new LLM to continue."
            ) from None

    @staticmethod
    def _death_cause(w: WorkerProcHandle) -> str:
        w.proc.join(1.0)  # reap it, so the exit code is known
        code = w.proc.exitcode
        if code is None:
            return f"(pid {w.pid}) closed its control pipe"
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            why = (
                " (out of memory, or killed by another process)" if -code == signal.SIGKILL else ""
            )
            return f"(pid {w.pid}) was killed by {sig}{why}"
        return f"(pid {w.pid}) exited with code {code} (its output above may say why)"

    # ---- shutdown -------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Kill every worker at once: after a failure the survivors may be stuck in a collective."""
        logger.error("Stopping all workers: %s", reason)
        self._stop(graceful=False)
        self._closed = reason

    def _stop(self, graceful: bool) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _stop_workers(self.workers, graceful)

    def check_health(self) -> None:
        if self._closed is not None:
            raise RuntimeError(f"The workers are no longer running ({self._closed}).")
        if not self._lock.acquire(blocking=False):
            return  # a call is in flight: it sees a dead rank itself and fails
        try:
            for w in self.workers:
                if not w.proc.is_alive():
                    reason = f"worker rank {w.rank} {self._death_cause(w)}"
                    self._fail(reason)
                    raise RuntimeError(f"The workers are no longer running ({reason}).")
        finally:
            self._lock.release()

    def shutdown(self) -> None:
        if self._closed is None:
            self._closed = "the executor was shut down"
        if getattr(self, "_finalizer", None) is not None:
            self._stop(graceful=True)

    @property
    def worker_pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]


def _process_state(pid: int | None) -> str:
    """What a worker process is doing, as the OS says ('stopped', 'disk-sleep', ...)."""
    try:
        status = psutil.Process(pid).status()
    except (psutil.Error, ValueError, TypeError):
        return "gone"
    return "still working" if status in ("running", "sleeping") else status


def _port_was_taken(e: BaseException) -> bool:
    text = f"{e} {getattr(e, '__notes__', '')}"
    return "EADDRINUSE" in text or "Address already in use" in text


def _stop_workers(workers: list[WorkerProcHandle], graceful: bool) -> None:
    """Ask the workers to exit (graceful), kill those still running, reap all."""
    if graceful:
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send_bytes(_HEADER.pack(_SHUTDOWN_ID))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.proc.exitcode is None:
            w.proc.kill()
    for w in workers:
        w.proc.join(JOIN_TIMEOUT_S)
        w.conn.close()


class _ConfigSnapshot:
    """A Hugging Face config that unpickles without importing transformers.

    Importing transformers costs a worker about 4 s of CPU, more than torch; the model
    code only reads attributes. Instance attributes and plain class attributes are
    copied; the class's aliases (GPT-2's ``hidden_size`` -> ``n_embd``) resolve as on
    the original; a method or property is answered by the real config, unpickled (and
    transformers imported) on first use.
    """

    def __init__(self, config: Any):
        cls = type(config)
        for name in dir(cls):
            value = inspect.getattr_static(cls, name, None)
            if not name.startswith("__") and isinstance(value, (str, int, float, bool)):
                self.__dict__[name] = value
        self.__dict__.update(vars(config))
        self._vllm_aliases = dict(getattr(cls, "attribute_map", None) or {})
        self._vllm_class_names = frozenset(n for n in dir(cls) if not n.startswith("__"))
        self._vllm_pickled = pickle.dumps(config)
        self._vllm_real = None

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__  # only reached when normal lookup failed
        if not name.startswith("__"):
            if d.get("_vllm_aliases", {}).get(name) in d:
                return d[d["_vllm_aliases"][name]]
            if name in d.get("_vllm_class_names", ()):
                if d["_vllm_real"] is None:
                    d["_vllm_real"] = pickle.loads(d["_vllm_pickled"])
                return getattr(d["_vllm_real"], name)
        raise AttributeError(f"The model config has no attribute {name!r}.")


# ---- the worker process -------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _exit_when_orphaned(parent_pid: int) -> None:
    # Covers the case pipe EOF cannot: the main thread blocked inside a collective.
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(
    vllm_config: VllmConfig, rank: int, init_method: str, conn: Connection, parent_pid: int
) -> None:
    """Entry point of a worker process: serve calls until told to stop or the engine goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    _prefix_log_lines(f"(rank {rank} pid {os.getpid()}) ")
    try:
        import torch

        from vllm.distributed import destroy_distributed_environment
        from vllm.worker.worker import Worker

        world_size = vllm_config.parallel_config.world_size
        if vllm_config.device_config.device == "cpu":
            # The ranks share the cores; more threads than that only contend.
            torch.set_num_threads(max(1, _cpu_count() // world_size))
        worker = Worker(vllm_config, rank=rank, distributed_init_method=init_method)
    except BaseException as e:
        _send_reply(conn, _FATAL_ID, False, (e, traceback.format_exc()))
        raise
    try:
        _serve(worker, conn)
    finally:
        destroy_distributed_environment()
        conn.close()
    # Nothing is left to clean up: skip the interpreter's teardown of torch (~1 s).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(worker: Any, conn: Connection) -> None:
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the engine is gone
        (call_id,) = _HEADER.unpack_from(message)
        if call_id == _SHUTDOWN_ID:
            return
        try:
            method, args, kwargs = pickle.loads(memoryview(message)[_HEADER.size :])
            fn = getattr(worker, method) if isinstance(method, str) else partial(method, worker)
            reply = (True, fn(*args, **kwargs))
        except Exception as e:
            reply = (False, (e, traceback.format_exc()))
        _send_reply(conn, call_id, *reply)


def _send_reply(conn: Connection, call_id: int, ok: bool, value: Any) -> None:
    try:
        data = pickle.dumps((call_id, ok, value))
    except Exception as e:  # an unpicklable result or exception: send what can be sent
        if ok:
            err: BaseException = TypeError(f"The result does not pickle: {e}")
            value = (err, traceback.format_exc())
        else:
            exc, tb = value
            value = (RuntimeError(f"{type(exc).__name__}: {exc}"), tb)
        data = pickle.dumps((call_id, False, value))
    with contextlib.suppress(OSError):  # the engine may be gone
        conn.send_bytes(data)


def _prefix_log_lines(prefix: str) -> None:
    """Tag this process's log lines with its rank, as upstream's workers do."""
    import logging

    for handler in logging.getLogger("vllm").handlers:
        fmt = handler.formatter._fmt if handler.formatter else "%(message)s"
        datefmt = handler.formatter.datefmt if handler.formatter else None
        handler.setFormatter(logging.Formatter(prefix + fmt, datefmt=datefmt))
