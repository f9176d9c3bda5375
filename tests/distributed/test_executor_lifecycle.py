"""Worker failures and shutdown of the multiprocess executor: nothing hangs, nothing leaks."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from tests.distributed import worker_fns
from tests.utils import device_for
from vllm import LLM, SamplingParams
from vllm.executor import multiproc_executor
from vllm.testing import make_model

ENGINE_ARGS = dict(
    dtype="float32", max_model_len=512, num_gpu_blocks_override=256, device=device_for(2)
)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [3, 4, 5, 6, 7, 8, 9], [20, 21]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=1000)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def _our_children() -> list[psutil.Process]:
    """Live child processes, less multiprocessing's own resource tracker (one per parent)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _port(llm: LLM) -> int:
    return int(llm.llm_engine.model_executor.distributed_init_method.rsplit(":", 1)[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# ---- failures -----------------------------------------------------------------------------


def test_killing_a_worker_mid_generation_raises_quickly(model_dir):
    llm = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    pids = llm.llm_engine.model_executor.worker_pids
    killer = threading.Timer(1.0, os.kill, args=(pids[1], signal.SIGKILL))
    long_run = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
    start = time.monotonic()
    killer.start()
    with pytest.raises(RuntimeError, match=r"Worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate(PROMPTS * 2, long_run, use_tqdm=False)
    assert time.monotonic() - start < 30
    assert _wait_gone(pids, timeout=1.0) == []
    assert _our_children() == []
    with pytest.raises(RuntimeError, match="no longer running.*rank 1"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    del llm


def test_stopped_worker_mid_generation_fails_within_the_bound(model_dir, monkeypatch):
    """A worker that stops answering (SIGSTOP, stuck in the kernel) fails generate() within
    VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, naming it, instead of gloo's 600 s; no process is
    left once it is allowed to go on."""
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3")
    llm = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    pids = llm.llm_engine.model_executor.worker_pids
    stopper = threading.Timer(1.0, os.kill, args=(pids[1], signal.SIGSTOP))
    long_run = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
    start = time.monotonic()
    stopper.start()
    try:
        with pytest.raises(TimeoutError, match=r"within 3 s: .*rank 1 \(pid \d+\) is stopped"):
            llm.generate(PROMPTS * 2, long_run, use_tqdm=False)
        assert time.monotonic() - start < 20
    finally:
        stopper.join()
        with contextlib.suppress(ProcessLookupError):  # it was killed already
            os.kill(pids[1], signal.SIGCONT)
    assert _wait_gone(pids, timeout=5.0) == []
    assert _our_children() == []
    with pytest.raises(RuntimeError, match="no longer running.*took longer than 3 s"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    del llm


def test_execute_model_timeout_values(monkeypatch):
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "inf")
    assert multiproc_executor.execute_model_timeout() is None  # no bound
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1e12")
    assert multiproc_executor.execute_model_timeout() == 1e6  # what wait() takes
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
    assert multiproc_executor.execute_model_timeout() == 30


def test_bad_execute_model_timeout_is_named(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS='soon'"):
        LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    assert _our_children() == []


def test_killing_the_driver_between_steps_raises(model_dir):
    llm = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    engine = llm.llm_engine
    pids = engine.model_executor.worker_pids
    engine.add_request("r", PROMPTS[0], GREEDY)
    engine.step()
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Worker rank 0 \(pid \d+\) was killed by SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30
    assert _wait_gone(pids, timeout=1.0) == []
    assert _our_children() == []
    del llm, engine


def test_rank_stuck_in_collective_after_peer_error_is_stopped(model_dir, monkeypatch):
    monkeypatch.setattr(multiproc_executor, "ERROR_GRACE_S", 1.0)
    llm = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    pids = llm.llm_engine.model_executor.worker_pids
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 fails before the barrier") as info:
        llm.collective_rpc(worker_fns.fail_while_peers_wait)
    assert time.monotonic() - start < 10
    assert "Ranks [0] did not answer" in "\n".join(info.value.__notes__)
    assert _wait_gone(pids, timeout=1.0) == []
    assert _our_children() == []
    del llm


def test_failed_start_leaves_no_process(model_dir, tmp_path):
    path = tmp_path / "truncated"
    shutil.copytree(model_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="model.safetensors is truncated") as info:
        LLM(model=str(path), tensor_parallel_size=2, **ENGINE_ARGS)
    assert "worker rank 0 running 'load_model'" in "\n".join(info.value.__notes__)
    assert _our_children() == []


def test_two_engines_side_by_side_then_del_leaves_nothing(model_dir):
    first = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    second = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    assert _port(first) != _port(second)
    expected = _tokens(first)
    assert _tokens(second) == expected
    pids, port = second.llm_engine.model_executor.worker_pids, _port(second)
    assert _listening(port)
    del second
    gc.collect()
    assert _wait_gone(pids, timeout=1.0) == []
    assert not _listening(port)
    assert _tokens(first) == expected  # the other engine is untouched
    del first
    gc.collect()
    assert _our_children() == []


_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32",
                  max_model_len=512, num_gpu_blocks_override=256, device=sys.argv[3])
        executor = llm.llm_engine.model_executor
        port = int(executor.distributed_init_method.rsplit(":", 1)[1])
        print(json.dumps({"pids": executor.worker_pids, "port": port}), flush=True)
        if sys.argv[2] == "sigkill":  # the engine's process dies mid-generation
            threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGKILL)).start()
            llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=480, ignore_eos=True),
                         use_tqdm=False)
        # "exit": leave with the engine alive; finalizers must stop the workers.
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_workers_exit_with_the_engine_process(model_dir, tmp_path, how):
    script = tmp_path / "engine_script.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), model_dir, how, ENGINE_ARGS["device"]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    info = json.loads(proc.stdout.strip().splitlines()[0])
    if how == "exit":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert _wait_gone(info["pids"], timeout=10.0) == []
    assert not _listening(info["port"])
