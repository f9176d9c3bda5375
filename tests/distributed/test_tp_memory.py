"""At TP=2 each rank reads and holds only its slices of the checkpoint."""

from __future__ import annotations

import pytest

from tests.distributed import worker_fns
from vllm import LLM
from vllm.testing import make_model

# About 200 MB of float32 weights: 4 layers of 12.6M parameters, mostly linear layers.
BIG = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("big")), vocab_size=1000, **BIG)


def _load(path: str, tp: int) -> tuple[list[int], list[int]]:
    """Per rank: (bytes of parameters, RSS growth while loading), both in worker processes."""
    llm = LLM(
        model=path,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp",  # TP=1 in a worker process too, for a fair baseline
        device="cpu",  # the parameters in host memory, as the RSS measures
        dtype="float32",
        max_model_len=64,
        num_gpu_blocks_override=4,
    )
    params = llm.collective_rpc(worker_fns.param_bytes)
    growth = [peak - before for before, peak in llm.collective_rpc(worker_fns.load_memory)]
    del llm
    return params, growth


def test_each_rank_loads_only_its_slices(big_model):
    (params_tp1,), (growth_tp1,) = _load(big_model, 1)
    params_tp2, growth_tp2 = _load(big_model, 2)
    assert params_tp1 > 190e6
    print(f"TP=1 load growth {growth_tp1 / 1e6:.0f} MB; TP=2 {[g // 10**6 for g in growth_tp2]} MB")
    for params, growth in zip(params_tp2, growth_tp2):
        assert params < 0.55 * params_tp1
        assert growth < 0.75 * growth_tp1
