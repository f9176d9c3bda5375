"""Greedy tokens at tensor_parallel_size=N equal N=1 and transformers (on the CPU with
gloo, unless the machine has a GPU for every rank of every case)."""

from __future__ import annotations

import pytest

from tests.utils import device_for, hf_greedy, random_prompts
from vllm import LLM, SamplingParams
from vllm.testing import make_model

MAX_TOKENS = 16
NUM_PROMPTS = 4
# Same float32 math split differently: all-reduce summation order moves logprobs ~1e-6.
LOGPROB_ATOL = 1e-4

# name -> (arch, vocab size, config overrides)
MODELS = {
    "llama": ("llama", 1000, {}),  # 4 heads, 2 KV heads
    "gpt2-odd-vocab": ("gpt2", 50257, {}),
    "gpt_neox": ("gpt_neox", 1000, {}),
    "opt": ("opt", 1000, {}),
    "gpt_bigcode": ("gpt_bigcode", 1000, {}),  # one KV head (multi-query)
    # 9 heads over 3 ranks, 3 KV heads; head_dim 16 stays even for rotary.
    "llama-9heads": (
        "llama",
        1000,
        dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=288),
    ),
}

CASES = [
    ("llama", 2),
    ("gpt2-odd-vocab", 2),
    ("gpt_neox", 2),
    ("opt", 2),
    ("gpt_bigcode", 2),
    ("llama", 4),  # 2 KV heads replicated over 4 ranks
    ("gpt_bigcode", 4),  # 1 KV head replicated over 4 ranks
    ("llama-9heads", 3),
]
DEVICE = device_for(max(tp for _, tp in CASES))  # TP=1 and TP=N on the same device


def _run(path: str, prompts, tp: int):
    backend = "uni" if tp == 1 else "mp"
    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=128,
        tensor_parallel_size=tp,
        device=DEVICE,
        distributed_executor_backend=backend,
        num_gpu_blocks_override=64,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    return [o.outputs[0] for o in outputs]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per model: (path, prompts, transformers tokens, TP=1 completions), built once."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            arch, vocab, overrides = MODELS[name]
            path = make_model(arch, str(tmp_path_factory.mktemp(name)), vocab, **overrides)
            prompts = random_prompts(NUM_PROMPTS, vocab, max_len=16)
            hf_tokens, _ = hf_greedy(path, prompts, MAX_TOKENS)
            cache[name] = (path, prompts, hf_tokens, _run(path, prompts, 1))
        return cache[name]

    return get


@pytest.mark.parametrize(("name", "tp"), CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_greedy_tp_matches_tp1_and_transformers(references, name, tp):
    path, prompts, hf_tokens, tp1 = references(name)
    assert [c.token_ids for c in tp1] == hf_tokens
    outputs = _run(path, prompts, tp)
    assert [c.token_ids for c in outputs] == hf_tokens
    for got, ref in zip(outputs, tp1):
        for lp_got, lp_ref, tok in zip(got.logprobs, ref.logprobs, ref.token_ids):
            assert lp_got[tok].logprob == pytest.approx(lp_ref[tok].logprob, abs=LOGPROB_ATOL)
