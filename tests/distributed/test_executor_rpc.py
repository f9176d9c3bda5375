"""collective_rpc through the multiprocess executor (CPU, gloo): one shared TP=2 engine."""

from __future__ import annotations

import gc
import os

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


@pytest.fixture(scope="module")
def llm(model_dir):
    """One TP=2 engine shared by the tests that leave it working."""
    engine = LLM(model=model_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    yield engine
    del engine
    gc.collect()


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_collective_rpc_runs_on_every_rank(llm):
    executor = llm.llm_engine.model_executor
    assert isinstance(executor, multiproc_executor.MultiprocExecutor)
    results = llm.collective_rpc(worker_fns.rank_and_pid)
    assert [rank for rank, _ in results] == [0, 1]
    assert [pid for _, pid in results] == executor.worker_pids
    assert os.getpid() not in executor.worker_pids
    # Method names, positional and keyword arguments.
    assert len(executor.collective_rpc("get_cache_block_size_bytes")) == 2
    assert executor.collective_rpc(worker_fns.fail_on_rank, args=(7,)) == [0, 1]
    assert llm.collective_rpc(worker_fns.fail_on_rank, kwargs={"rank": 7}) == [0, 1]
    # Two ranks share the machine's cores.
    cpus = len(os.sched_getaffinity(0))
    assert llm.collective_rpc(worker_fns.num_threads) == [max(1, cpus // 2)] * 2


def test_rpc_has_no_message_size_limit(llm):
    size = 32 << 20
    assert [len(b) for b in llm.collective_rpc(worker_fns.big_result, args=(size,))] == [size] * 2


def test_worker_exception_reaches_caller_and_engine_survives(llm):
    expected = _tokens(llm)
    with pytest.raises(ValueError, match="deliberate failure on rank 1") as info:
        llm.collective_rpc(worker_fns.fail_on_rank, args=(1,))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "worker rank 1" in notes and "Traceback" in notes and "fail_on_rank" in notes
    with pytest.raises(AttributeError, match="no_such_method"):
        llm.collective_rpc("no_such_method")
    assert _tokens(llm) == expected


def test_timeout_leaves_channel_in_sync(llm):
    with pytest.raises(TimeoutError, match="'sleep' did not finish within 0.2 s"):
        llm.collective_rpc(worker_fns.sleep, timeout=0.2, args=(1.0,))
    # The late answers of the timed-out call are dropped, not taken for this call's.
    assert [r for r, _ in llm.collective_rpc(worker_fns.rank_and_pid)] == [0, 1]
