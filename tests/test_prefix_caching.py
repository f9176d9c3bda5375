"""Automatic prefix caching is invisible in outputs: requests that reuse cached KV blocks
get exactly the tokens (and logprobs) they get with caching off, while
``RequestOutput.num_cached_tokens`` reports how much of each prompt was reused."""

from __future__ import annotations

import math

import pytest

from tests.utils import random_prompts
from vllm import LLM, SamplingParams
from vllm.testing import make_model

VOCAB = 1000
MAX_MODEL_LEN = 128
BLOCK_SIZE = 8
SYSTEM = random_prompts(1, VOCAB, min_len=37, max_len=37, seed=7)[0]
TAILS = random_prompts(8, VOCAB, min_len=2, max_len=12, seed=8)
# Requests sharing a system prompt, two of them repeated verbatim.
PROMPTS = [SYSTEM + tail for tail in TAILS] + [SYSTEM + TAILS[0], SYSTEM + TAILS[3]]


def _params(i: int) -> SamplingParams:
    """Greedy, seeded random, and n > 1 requests, all with logprobs to compare."""
    if i % 3 == 1:
        return SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True, logprobs=2)
    if i % 3 == 2:
        return SamplingParams(n=2, temperature=0.9, seed=i, max_tokens=9, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True, logprobs=2)


PARAMS = [_params(i) for i in range(len(PROMPTS))]
# 12 blocks of 8 tokens hold two of these sequences, not four: requests are preempted and
# cached blocks evicted while others still need them.
SMALL_CACHE = dict(max_num_seqs=4, num_gpu_blocks_override=12, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=VOCAB)


def _run(model_dir: str, caching: bool, **kwargs) -> list:
    llm = LLM(
        model=model_dir,
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=caching,
        **kwargs,
    )
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)


def _assert_same_outputs(cached: list, uncached: list) -> None:
    for a, b in zip(cached, uncached):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        for oa, ob in zip(a.outputs, b.outputs):
            assert math.isclose(oa.cumulative_logprob, ob.cumulative_logprob, abs_tol=1e-3)
            for la, lb in zip(oa.logprobs or [], ob.logprobs or []):
                assert la.keys() == lb.keys()
                for t in la:
                    assert math.isclose(la[t].logprob, lb[t].logprob, abs_tol=1e-3)


@pytest.fixture(scope="module")
def uncached(model_dir) -> list:
    outputs = _run(model_dir, caching=False)
    assert all(o.num_cached_tokens == 0 for o in outputs)
    return outputs


@pytest.mark.parametrize("config", [{}, SMALL_CACHE], ids=["one-batch", "small-cache"])
def test_outputs_identical_with_prefix_caching(model_dir, uncached, config) -> None:
    cached = _run(model_dir, caching=True, **config)
    _assert_same_outputs(cached, uncached)
    # Every request after the first finds at least the system prompt's full blocks.
    full_system_blocks = len(SYSTEM) // BLOCK_SIZE * BLOCK_SIZE
    assert all(o.num_cached_tokens >= full_system_blocks for o in cached[1:])
    assert all(o.num_cached_tokens < len(o.prompt_token_ids) for o in cached)


def test_follow_up_turn_reuses_the_previous_answer(model_dir) -> None:
    """A chat's next turn sends the previous prompt and answer again: both are cached."""
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPTS[0]}, greedy, use_tqdm=False)[0]
    turn = PROMPTS[0] + list(first.outputs[0].token_ids) + TAILS[5]
    second = llm.generate({"prompt_token_ids": turn}, greedy, use_tqdm=False)[0]
    # All the first request computed (its last sampled token never ran), in full blocks.
    computed = len(PROMPTS[0]) + 10 - 1
    assert second.num_cached_tokens == computed // BLOCK_SIZE * BLOCK_SIZE
    fresh = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False)
    expected = fresh.generate({"prompt_token_ids": turn}, greedy, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids


def test_prompt_logprobs_are_computed_not_read_from_the_cache(model_dir) -> None:
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    warm = llm.generate({"prompt_token_ids": PROMPTS[1]}, params, use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": PROMPTS[1]}, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert len(again.prompt_logprobs) == len(PROMPTS[1])
    for a, b in zip(again.prompt_logprobs[1:], warm.prompt_logprobs[1:]):
        assert {t: lp.logprob for t, lp in a.items()} == pytest.approx(
            {t: lp.logprob for t, lp in b.items()}, abs=1e-4
        )


def test_reset_prefix_cache(model_dir) -> None:
    llm = LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
    greedy = SamplingParams(temperature=0, max_tokens=2)
    llm.generate({"prompt_token_ids": PROMPTS[2]}, greedy, use_tqdm=False)
    assert llm.reset_prefix_cache() is True
    again = llm.generate({"prompt_token_ids": PROMPTS[2]}, greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0


@pytest.mark.parametrize("config", [{}, SMALL_CACHE], ids=["one-batch", "small-cache"])
def test_tensor_parallel_outputs_identical_with_prefix_caching(model_dir, config) -> None:
    tp = dict(tensor_parallel_size=2, **config)
    _assert_same_outputs(_run(model_dir, True, **tp), _run(model_dir, False, **tp))
