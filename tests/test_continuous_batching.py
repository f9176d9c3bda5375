"""Continuous batching is invisible to users: batched, chunked, preempted requests get
exactly the tokens they would get if each ran alone."""

from __future__ import annotations

import pytest

from tests.utils import random_prompts
from vllm import LLM, SamplingParams
from vllm.testing import make_model

VOCAB = 1000
MAX_MODEL_LEN = 64
NUM_REQUESTS = 12
# Prompts of 3..30 tokens; max_tokens 4..26, so requests finish at different steps.
PROMPTS = random_prompts(NUM_REQUESTS, VOCAB, min_len=3, max_len=30)
MAX_TOKENS = [4 + 2 * i for i in range(NUM_REQUESTS)]


def _params(i: int) -> SamplingParams:
    """Even requests are greedy, odd ones seeded random: a seed fixes the tokens too."""
    if i % 2 == 0:
        return SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i], ignore_eos=True)
    return SamplingParams(temperature=0.8, seed=i, max_tokens=MAX_TOKENS[i], ignore_eos=True)


PARAMS = [_params(i) for i in range(NUM_REQUESTS)]

# A cache of 8 blocks of 8 tokens holds one sequence (<= 56 tokens) but not four: the
# scheduler must preempt. With 16 tokens a step, prompts longer than 16 are chunked.
SMALL_CACHE = dict(max_num_seqs=4, block_size=8, num_gpu_blocks_override=8)
CONFIGS = {
    "one-batch": dict(),
    "chunked-prefill-preemption": dict(**SMALL_CACHE, max_num_batched_tokens=16),
    "whole-prefill-preemption": dict(
        **SMALL_CACHE, enable_chunked_prefill=False, max_num_batched_tokens=MAX_MODEL_LEN
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def alone(model_dir) -> list[list[int]]:
    """Each request run by itself: nothing else in the batch, no preemption."""
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN)
    return [
        llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        for prompt, params in zip(PROMPTS, PARAMS)
    ]


def _record_schedules(llm: LLM) -> list:
    """Keep every SchedulerOutput the engine runs, to check what the scheduler did."""
    scheduler = llm.llm_engine.scheduler
    outputs = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        outputs.append(out)
        return out

    scheduler.schedule = recording_schedule
    return outputs


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batched_tokens_equal_alone(model_dir, alone, config):
    kwargs = CONFIGS[config]
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, **kwargs)
    schedules = _record_schedules(llm)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)

    assert [o.prompt_token_ids for o in outputs] == PROMPTS
    got = [o.outputs[0].token_ids for o in outputs]
    mismatched = [i for i in range(NUM_REQUESTS) if got[i] != alone[i]]
    assert not mismatched, f"requests {mismatched} differ from running alone"
    assert [len(t) for t in got] == MAX_TOKENS

    # The settings really exercised what the test name says.
    batch_sizes = [len(so.num_scheduled_tokens) for so in schedules]
    assert 1 < max(batch_sizes) <= kwargs.get("max_num_seqs", NUM_REQUESTS)
    preemptions = llm.llm_engine.scheduler.num_preemptions
    split_prefills = [
        s.seq_id
        for so in schedules
        for s in so.new_seqs
        if so.num_scheduled_tokens[s.seq_id] < len(s.token_ids) - s.num_computed_tokens
    ]
    if config == "one-batch":
        assert batch_sizes[0] == NUM_REQUESTS  # every prompt prefilled in the first step
        assert len(schedules) == max(MAX_TOKENS)
        assert preemptions == 0
    else:
        assert preemptions > 0
        budget = kwargs["max_num_batched_tokens"]
        assert max(so.total_num_scheduled_tokens for so in schedules) <= budget
        if kwargs.get("enable_chunked_prefill", True):
            assert split_prefills, "no prompt was split into chunks"
    if not kwargs.get("enable_chunked_prefill", True):
        assert not split_prefills


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["c-kernel", "torch"])
def test_unwritten_kv_slots_are_never_read(model_dir, alone, monkeypatch, decode_kernel):
    """The CPU KV cache is allocated uninitialised (zeroing gigabytes would slow start-up):
    poison it with NaN, except slot 0 where the torch path pads decodes, and the tokens
    must not change. Run on both decode paths, which must also agree with each other."""
    from vllm import _custom_ops as ops
    from vllm.worker.worker import Worker

    if decode_kernel and ops._C is None:
        pytest.skip("vllm._C was not built")
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", decode_kernel)
    allocate = Worker.initialize_cache

    def poisoned(self, num_blocks):
        allocate(self, num_blocks)
        self.kv_cache.fill_(float("nan"))
        self.kv_cache[:, :, 0].zero_()

    monkeypatch.setattr(Worker, "initialize_cache", poisoned)
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, **CONFIGS["chunked-prefill-preemption"])
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == alone
