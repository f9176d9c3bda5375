"""The offline ``LLM`` API as users call it: upstream vLLM's names, inputs, outputs, errors."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from vllm import LLM, SamplingParams
from vllm.testing import make_model

VOCAB = 1000
MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, max_model_len=MAX_MODEL_LEN)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_public_imports_and_cli_parser():
    from vllm import EngineArgs, RequestOutput
    from vllm.utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    # Upstream scripts use both spellings of a flag.
    args = parser.parse_args(["--model", "m", "--max_num_seqs", "3", "--max-model-len", "32"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.model, engine_args.max_num_seqs, engine_args.max_model_len) == ("m", 3, 32)
    assert {"request_id", "prompt", "prompt_token_ids", "outputs", "finished"} <= set(
        RequestOutput.__dataclass_fields__
    )


def test_prompt_forms_give_the_same_tokens(llm):
    text = "The quick brown fox"
    ids = llm.get_tokenizer().encode(text)
    (from_text,) = llm.generate(text, GREEDY, use_tqdm=False)
    assert from_text.prompt == text
    assert from_text.prompt_token_ids == ids
    expected = from_text.outputs[0].token_ids
    assert len(expected) == GREEDY.max_tokens

    forms = {
        "list of strings": [text, text],
        "one token-id list": ids,
        "list of token-id lists": [ids, ids],
        "token-id dict": {"prompt_token_ids": ids},
        "list of dicts": [{"prompt_token_ids": ids}, {"prompt": text}],
    }
    for name, prompts in forms.items():
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        want = 1 if isinstance(prompts, dict) or prompts is ids else 2
        assert len(outputs) == want, name
        for out in outputs:
            assert out.prompt_token_ids == ids, name
            assert out.outputs[0].token_ids == expected, name
            assert out.finished


def test_outputs_come_back_in_input_order(llm):
    # The first request runs longest, so requests finish in the reverse of input order.
    prompts = [[10 + i] * (3 + i) for i in range(4)]
    params = [
        SamplingParams(temperature=0, max_tokens=8 - 2 * i, ignore_eos=True) for i in range(4)
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 6, 4, 2]
    assert len({o.request_id for o in outputs}) == 4


def test_one_or_a_list_of_sampling_params(llm):
    prompts = [[5, 6, 7], [8, 9]]
    shared = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert [len(t) for t in _tokens(shared)] == [3, 3]
    each = [SamplingParams(max_tokens=2, temperature=0), SamplingParams(max_tokens=5)]
    outputs = llm.generate(prompts, each, use_tqdm=False)
    assert [len(t) for t in _tokens(outputs)] == [2, 5]
    assert outputs[0].outputs[0].token_ids == shared[0].outputs[0].token_ids[:2]

    with pytest.raises(ValueError, match="3 sampling params for 2 prompts"):
        llm.generate(prompts, [SamplingParams()] * 3, use_tqdm=False)
    # Without sampling params, upstream's defaults apply: 16 tokens.
    (default,) = llm.generate([[5, 6, 7]], use_tqdm=False)
    assert len(default.outputs[0].token_ids) == 16 or default.outputs[0].finish_reason == "stop"


def test_completion_fields(llm):
    k = 3
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=k)
    (out,) = llm.generate("Hello world", params, use_tqdm=False)
    comp = out.outputs[0]
    assert comp.index == 0
    assert comp.finish_reason == "length" and comp.stop_reason is None
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids, skip_special_tokens=True)
    assert len(comp.logprobs) == len(comp.token_ids) == 8
    for token_id, step in zip(comp.token_ids, comp.logprobs):
        # Greedy picks the most likely token, so it is among the top k.
        assert len(step) == k and token_id in step
        assert step[token_id].logprob == max(lp.logprob for lp in step.values())
        assert all(lp.logprob <= 0 for lp in step.values())
    sampled = [step[t].logprob for t, step in zip(comp.token_ids, comp.logprobs)]
    assert comp.cumulative_logprob == pytest.approx(sum(sampled), abs=1e-4)

    # Random sampling also picks tokens outside the top k: those steps have k + 1 entries.
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=16, ignore_eos=True, logprobs=k)
    (out,) = llm.generate("Hello world", params, use_tqdm=False)
    comp = out.outputs[0]
    for token_id, step in zip(comp.token_ids, comp.logprobs):
        assert len(step) in (k, k + 1) and token_id in step
        if len(step) == k + 1:  # the k others are the top k, all more likely
            others = [lp.logprob for t, lp in step.items() if t != token_id]
            assert step[token_id].logprob < min(others)
    assert any(len(step) == k + 1 for step in comp.logprobs)
    sampled = [step[t].logprob for t, step in zip(comp.token_ids, comp.logprobs)]
    assert comp.cumulative_logprob == pytest.approx(sum(sampled), abs=1e-4)
    assert math.isfinite(comp.cumulative_logprob)


def test_logprobs_above_max_logprobs_is_an_error(llm):
    with pytest.raises(ValueError, match="max_logprobs=20"):
        llm.generate("Hello", SamplingParams(logprobs=21), use_tqdm=False)


def test_n_completions(llm):
    prompt = [[11, 12, 13, 14]]
    (greedy,) = llm.generate(
        prompt, SamplingParams(n=2, temperature=0, max_tokens=8), use_tqdm=False
    )
    assert [c.index for c in greedy.outputs] == [0, 1]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids

    for seed in (None, 7):
        params = SamplingParams(n=3, temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True)
        (out,) = llm.generate(prompt, params, use_tqdm=False)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 8 for c in out.outputs)
        assert len({tuple(c.token_ids) for c in out.outputs}) == 3, f"seed={seed}"
    # Seeded: the same three completions again.
    (again,) = llm.generate(prompt, params, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_prompt_longer_than_max_model_len(llm):
    too_long = list(range(2, 2 + MAX_MODEL_LEN + 5))
    with pytest.raises(ValueError, match=f"max_model_len={MAX_MODEL_LEN}"):
        llm.generate(too_long, GREEDY, use_tqdm=False)
    # A bad prompt fails the whole call and leaves nothing behind in the engine.
    with pytest.raises(ValueError, match="too long"):
        llm.generate([[5, 6, 7], too_long], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    (out,) = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_token_ids_of_the_wrong_type_are_named(llm):
    """Floats, bools and strings are not token ids; numpy integers are."""
    import numpy as np

    cases = {
        "float": ([5.0, 6.0], r"item 0 is 5\.0 \(float\)"),
        "bool": ({"prompt_token_ids": [5, True]}, r"item 1 is True \(bool\)"),
        "string": ({"prompt_token_ids": ["5", "6"]}, r"item 0 is '5' \(str\)"),
        "string as ids": ({"prompt_token_ids": "5 6"}, r"a list of integers, got '5 6'"),
    }
    for prompt, message in cases.values():
        with pytest.raises((ValueError, TypeError), match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    as_ints = _tokens(llm.generate([5, 6, 7], GREEDY, use_tqdm=False))
    assert _tokens(llm.generate(list(np.array([5, 6, 7])), GREEDY, use_tqdm=False)) == as_ints
    as_tensor = {"prompt_token_ids": torch.tensor([5, 6, 7])}  # a tokenizer's return_tensors
    assert _tokens(llm.generate(as_tensor, GREEDY, use_tqdm=False)) == as_ints


def test_seed_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64 - n\]"):
        SamplingParams(seed=2**70)
    with pytest.raises(ValueError, match=r"\(n=4\), got 18446744073709551614"):
        SamplingParams(seed=2**64 - 2, n=4)  # sample 3 would use seed + 3
    SamplingParams(seed=2**64 - 4, n=4)


def test_bad_kv_cache_space_is_named(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    for value in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
        with pytest.raises(ValueError, match=f"VLLM_CPU_KVCACHE_SPACE='{value}' is not a size"):
            EngineArgs(model=model_dir, device="cpu").create_engine_config()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")  # upstream's "the default"
    config = EngineArgs(model=model_dir, device="cpu").create_engine_config()
    assert config.cache_config.cpu_kvcache_space_bytes == 4 << 30


def test_unknown_kwarg_is_a_type_error(model_dir):
    with pytest.raises(TypeError, match="max_num_seq\\b"):
        LLM(model=model_dir, max_num_seq=4)  # typo of max_num_seqs


def test_unused_vllm_arg_warns(model_dir, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="vllm"):
        LLM(model=model_dir, max_model_len=MAX_MODEL_LEN, swap_space=8)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("swap_space=8" in w for w in warnings), warnings


def test_unsupported_architecture_lists_supported_ones(model_dir, tmp_path):
    path = tmp_path / "unknown-arch"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as err:
        LLM(model=str(path))
    assert "LlamaForCausalLM" in str(err.value) and "GPT2LMHeadModel" in str(err.value)


def test_progress_bar(llm, capsys):
    llm.generate([[5, 6, 7], [8, 9]], GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
