"""Logprobs as users read them: prompt_logprobs against transformers' own scores, ranks,
decoded tokens, and the request's timing metrics."""

from __future__ import annotations

import pytest
import torch

from vllm import LLM, SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.testing import make_model

VOCAB = 400
K = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, max_model_len=128)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[len, V]: row j is transformers' log-softmax for the token after position j."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return logits.float().log_softmax(-1)


def _check_prompt_logprobs(out, hf_model, tokenizer, k: int) -> None:
    prompt = out.prompt_token_ids
    hf = _hf_logprobs(hf_model, prompt)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None  # nothing to score the first token against
    for i in range(1, len(prompt)):
        scored, row, token = out.prompt_logprobs[i], hf[i - 1], prompt[i]
        assert token in scored and len(scored) in (k, k + 1)
        assert scored[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert scored[token].rank == int((row > row[token]).sum()) + 1
        assert scored[token].decoded_token == tokenizer.decode([token])
        top_lp, top_ids = row.topk(k)
        others = {t: lp for t, lp in scored.items() if t != token or len(scored) == k}
        assert sorted(others) == sorted(top_ids.tolist())
        for rank, (t, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            assert scored[t].logprob == pytest.approx(lp, abs=1e-4)
            assert scored[t].rank == rank


def test_prompt_logprobs_match_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K)
    prompts = ["The quick brown fox jumps over the lazy dog", "Hello world, hello again"]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        _check_prompt_logprobs(out, hf_model, llm.get_tokenizer(), K)
    # prompt_logprobs=0: only the prompt's own tokens.
    (out,) = llm.generate(prompts[0], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert all(len(d) == 1 for d in out.prompt_logprobs[1:])
    # Not asked for: none.
    (out,) = llm.generate(prompts[0], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.prompt_logprobs is None


def test_prompt_logprobs_chunked_prefill_and_n(model_dir, hf_model):
    """A prompt prefilled over several steps, and n samples sharing it, are scored whole."""
    llm = LLM(model=model_dir, max_model_len=128, max_num_batched_tokens=8, max_num_seqs=4)
    prompt = list(range(5, 45))  # 40 tokens: five chunks of 8
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=K)
    (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert len(out.outputs) == 2
    _check_prompt_logprobs(out, hf_model, llm.get_tokenizer(), K)


def test_prompt_logprobs_at_tp2(model_dir, hf_model):
    llm = LLM(model=model_dir, max_model_len=128, tensor_parallel_size=2)
    (out,) = llm.generate(
        "Hello world, hello again", SamplingParams(max_tokens=1, prompt_logprobs=K)
    )
    _check_prompt_logprobs(out, hf_model, llm.get_tokenizer(), K)


def test_sampled_logprobs_have_ranks_and_text(llm, hf_model):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True, logprobs=K)
    (out,) = llm.generate("Hello world", params, use_tqdm=False)
    comp = out.outputs[0]
    hf = _hf_logprobs(hf_model, out.prompt_token_ids + comp.token_ids)
    tokenizer = llm.get_tokenizer()
    for j, (token, scored) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = hf[len(out.prompt_token_ids) + j - 1]
        assert scored[token].rank == int((row > row[token]).sum()) + 1
        assert scored[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = sorted((lp for t, lp in scored.items() if lp.rank <= K), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, K + 1))
        assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in scored.items())
    # detokenize=False leaves the text out.
    params = SamplingParams(max_tokens=2, logprobs=1, detokenize=False)
    (out,) = llm.generate("Hello world", params, use_tqdm=False)
    assert all(lp.decoded_token is None for d in out.outputs[0].logprobs for lp in d.values())


def test_prompt_logprobs_above_max_logprobs_is_an_error(llm):
    with pytest.raises(ValueError, match="prompt_logprobs=21, more than max_logprobs=20"):
        llm.generate("Hello", SamplingParams(prompt_logprobs=21), use_tqdm=False)


def test_delta_outputs_carry_prompt_logprobs_once(llm):
    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=4, ignore_eos=True, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA
    )
    engine.add_request("delta", "Hello world", params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert len(outs) == 4
    assert outs[0].prompt_logprobs is not None and outs[0].prompt_logprobs[0] is None
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_request_metrics(llm):
    import time

    before = time.time()
    outs = llm.generate(["Hello", "world"], SamplingParams(max_tokens=4), use_tqdm=False)
    after = time.time()
    for out in outs:
        m = out.metrics
        assert before <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time <= after
        assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)
        assert out.num_cached_tokens == 0
