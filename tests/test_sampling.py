"""Sampling parameters as users see them: where text stops, why, and which tokens come out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vllm import LLM, SamplingParams
from vllm.testing import make_model

# The tokenizer has < 512 tokens: a 512-token vocabulary makes nearly every id real text.
VOCAB = 512
MAX_TOKENS = 24
PROMPTS = ["Hello world, this is", "The quick brown fox", "Once upon a time", "San Francisco"]


def greedy(**kwargs) -> SamplingParams:
    kwargs = {"max_tokens": MAX_TOKENS, "ignore_eos": True, **kwargs}
    return SamplingParams(temperature=0, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, max_model_len=128)


@pytest.fixture(scope="module")
def reference(llm) -> list:
    """Plain greedy completions of PROMPTS, run to MAX_TOKENS."""
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].stop_reason is None
        assert len(out.outputs[0].token_ids) == MAX_TOKENS
    return [out.outputs[0] for out in outputs]


def _first_new_token(token_ids: list[int], start: int = 4) -> int:
    """Index (>= start) of a token that does not occur before it."""
    return next(i for i in range(start, len(token_ids)) if token_ids[i] not in token_ids[:i])


def _ascii_substring(text: str, start: int, size: int = 3) -> int:
    """Index (>= start) of a printable-ASCII substring that does not occur earlier."""
    return next(
        i
        for i in range(start, len(text) - size)
        if text[i : i + size].isascii()
        and text[i : i + size].isprintable()
        and text.find(text[i : i + size]) == i
    )


# ---------------------------------------------------------------- why generation stops


def test_stop_strings(llm, reference):
    text = reference[0].text
    at = _ascii_substring(text, 4)
    stop = text[at : at + 3]
    later_at = _ascii_substring(text, at + 3)
    later = text[later_at : later_at + 3]

    # The earliest stop string in the text wins, whatever its place in the list.
    for params in (greedy(stop=stop), greedy(stop=[later, stop])):
        (out,) = llm.generate(PROMPTS[0], params, use_tqdm=False)
        comp = out.outputs[0]
        assert comp.text == text[:at]
        assert (comp.finish_reason, comp.stop_reason) == ("stop", stop)
        assert len(comp.token_ids) < MAX_TOKENS

    (out,) = llm.generate(
        PROMPTS[0], greedy(stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )
    assert out.outputs[0].text == text[: at + 3]
    assert out.outputs[0].stop_reason == stop

    # min_tokens: a stop string within the first min_tokens tokens does not count.
    min_tokens = len(reference[0].token_ids) // 2
    assert stop in llm.get_tokenizer().decode(reference[0].token_ids[:min_tokens])
    (out,) = llm.generate(PROMPTS[0], greedy(stop=stop, min_tokens=min_tokens), use_tqdm=False)
    comp = out.outputs[0]
    assert len(comp.token_ids) > min_tokens
    assert comp.text.startswith(text[: at + 3])


def test_stop_token_ids(llm, reference):
    tokens = reference[1].token_ids
    i = _first_new_token(tokens)
    decode = llm.get_tokenizer().decode

    (out,) = llm.generate(PROMPTS[1], greedy(stop_token_ids=[tokens[i]]), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.token_ids == tokens[: i + 1]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", tokens[i])
    assert comp.text == decode(tokens[:i])  # the stop token's text is left out

    params = greedy(stop_token_ids=[tokens[i]], include_stop_str_in_output=True)
    (out,) = llm.generate(PROMPTS[1], params, use_tqdm=False)
    assert out.outputs[0].text == decode(tokens[: i + 1])

    # min_tokens: the stop token may not end generation before that many tokens.
    params = greedy(stop_token_ids=[tokens[i]], min_tokens=i + 4)
    (out,) = llm.generate(PROMPTS[1], params, use_tqdm=False)
    comp = out.outputs[0]
    assert len(comp.token_ids) >= i + 4
    assert comp.token_ids[:i] == tokens[:i]
    assert tokens[i] not in comp.token_ids[: i + 4]


def test_eos_stops_unless_ignore_eos(model_dir, reference, tmp_path):
    """The model's EOS ids (here from generation_config.json, as Llama 3 lists several)."""
    tokens = reference[2].token_ids
    i = _first_new_token(tokens)
    path = tmp_path / "eos-model"
    shutil.copytree(model_dir, path)
    gen_config = json.loads((path / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [1, tokens[i]]
    (path / "generation_config.json").write_text(json.dumps(gen_config))
    llm = LLM(model=str(path), max_model_len=128)

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    (out,) = llm.generate(PROMPTS[2], params, use_tqdm=False)
    comp = out.outputs[0]
    assert comp.token_ids == tokens[: i + 1]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", None)
    assert comp.text == llm.get_tokenizer().decode(tokens[:i])

    (out,) = llm.generate(PROMPTS[2], greedy(), use_tqdm=False)
    assert out.outputs[0].token_ids == tokens
    assert out.outputs[0].finish_reason == "length"

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=i + 4)
    (out,) = llm.generate(PROMPTS[2], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= i + 4
    assert tokens[i] not in out.outputs[0].token_ids[: i + 4]


def test_max_tokens_is_length(llm, reference):
    (out,) = llm.generate(PROMPTS[3], greedy(max_tokens=5), use_tqdm=False)
    assert out.outputs[0].token_ids == reference[3].token_ids[:5]
    assert out.outputs[0].finish_reason == "length"


# ---------------------------------------------------------------- which tokens come out


def test_seeded_sampling_is_reproducible(llm):
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)

    def tokens(prompts, params) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    (alone,) = tokens(PROMPTS[0], seeded(42))
    assert tokens(PROMPTS[0], seeded(42)) == [alone]
    # Other requests in the batch (greedy, seeded, unseeded) do not change a seeded one.
    batch = tokens(
        [PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[2]],
        [greedy(), seeded(42), seeded(43), SamplingParams(max_tokens=20)],
    )
    assert batch[1] == alone
    assert batch[2] != alone


def test_truncation_to_the_top_token_is_greedy(llm, reference):
    want = [comp.token_ids for comp in reference]
    for params in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.01, max_tokens=MAX_TOKENS, ignore_eos=True),
    ):
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == want, params
    # Without truncation, temperature sampling is not greedy.
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] != want


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_repetition_penalty_matches_transformers(llm, hf_model, reference):
    token_prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    outputs = llm.generate(
        token_prompts,
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )
    got = [o.outputs[0].token_ids for o in outputs]
    want = []
    with torch.no_grad():
        for prompt in token_prompts:
            ids = torch.tensor([prompt])
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                repetition_penalty=1.3,
                pad_token_id=0,
            )
            want.append(out[0, len(prompt) :].tolist())
    assert got == want
    assert got != [comp.token_ids for comp in reference]  # the penalty changed something


def _penalized_greedy(model, prompt: list[int], presence: float, frequency: float) -> list[int]:
    """Upstream's additive penalties on generated tokens, one full forward per step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=VOCAB)
            logits = logits - frequency * counts - presence * (counts > 0)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.5, 0.5)])
def test_presence_and_frequency_penalties(llm, hf_model, reference, presence, frequency):
    prompt = llm.get_tokenizer().encode(PROMPTS[0])
    params = greedy(presence_penalty=presence, frequency_penalty=frequency)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    got = out.outputs[0].token_ids
    assert got == _penalized_greedy(hf_model, prompt, presence, frequency)
    assert got != reference[0].token_ids


@pytest.mark.parametrize("banned,penalty", [(False, False), (True, False), (True, True)])
def test_sampler_kernel_path_matches_log_softmax(monkeypatch, banned, penalty):
    # The C path takes each row's argmax and logsumexp in one pass instead of a full
    # log_softmax: same tokens, same (raw-distribution) logprobs, logits left untouched.
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.sampler import Sampler, SamplingMetadata

    if ops._C is None:
        pytest.skip("vllm._C was not built")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=gen) * 4
    counts = (torch.rand(6, 1000, generator=gen) < 0.01).float() if penalty else None
    md = SamplingMetadata(
        all_greedy=True,
        temperature=torch.ones(6),
        greedy_mask=torch.ones(6, dtype=torch.bool),
        top_p=None,
        top_k=None,
        min_p=None,
        generators={},
        output_counts=counts,
        prompt_mask=None,
        presence_penalty=torch.full((6,), 2.0) if penalty else None,
        frequency_penalty=None,
        repetition_penalty=None,
        banned_tokens=[(0, logits[0].topk(3).indices.tolist())] if banned else [],
        max_num_logprobs=0,
    )
    before = logits.clone()
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", False)
    ref = Sampler()(logits.clone(), md)
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", True)
    out = Sampler()(logits, md)
    assert torch.equal(logits, before)
    assert torch.equal(out.token_ids, ref.token_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs)
    expected = before.log_softmax(-1).gather(-1, ref.token_ids[:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected)
