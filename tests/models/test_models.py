"""Greedy tokens and logprobs of every supported architecture against transformers."""

from __future__ import annotations

import pytest
import torch

from tests.utils import hf_greedy, random_prompts
from vllm import LLM, SamplingParams
from vllm.testing import make_model

MAX_TOKENS = 32
# float32 on both sides: the only differences are summation order and fused vs separate
# matmuls, ~1e-6 relative per op; over 2 layers the log-probabilities agree to ~1e-4.
FP32_ATOL = 2e-4

CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2"),
    "mistral": dict(arch="mistral"),
    # seed=1: with seed 0 one greedy step is an exact float32 tie (fp64 gap 9e-8) over
    # 50257 tokens, decided by summation order rather than by the model.
    "gpt2-odd-vocab": dict(arch="gpt2", vocab_size=50257, seed=1),
    "gpt2-n_inner": dict(arch="gpt2", n_inner=96, scale_attn_by_inverse_layer_idx=True),
    "gpt_neox": dict(arch="gpt_neox"),
    "gpt_neox-sequential": dict(arch="gpt_neox", use_parallel_residual=False),
    "gpt_neox-tied": dict(arch="gpt_neox", tie_word_embeddings=True),
    "opt": dict(arch="opt"),
    "opt-post-ln": dict(arch="opt", do_layer_norm_before=False, word_embed_proj_dim=64),
    "gpt_bigcode": dict(arch="gpt_bigcode"),
    "gpt_bigcode-mha": dict(arch="gpt_bigcode", multi_query=False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    arch = spec.pop("arch")
    vocab = spec.pop("vocab_size", 1000)
    path = str(tmp_path_factory.mktemp(request.param))
    make_model(arch, path, vocab_size=vocab, **spec)
    prompts = random_prompts(5, vocab)
    hf_tokens, hf_logprobs = hf_greedy(path, prompts, MAX_TOKENS)
    return path, prompts, hf_tokens, hf_logprobs


def test_greedy_matches_transformers(case):
    path, prompts, hf_tokens, hf_logprobs = case
    llm = LLM(model=path, dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, ref_tokens, ref_lp in zip(prompts, outputs, hf_tokens, hf_logprobs):
        comp = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert comp.token_ids == ref_tokens
        assert comp.finish_reason == "length"
        # Last step: our top-5 logprobs equal transformers' for the same tokens.
        last = comp.logprobs[-1]
        assert len(last) >= 5
        for token_id, lp in last.items():
            assert lp.logprob == pytest.approx(ref_lp[token_id].item(), abs=FP32_ATOL)
        assert set(last) >= set(ref_lp.topk(5).indices.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_close_to_transformers(tmp_path, dtype):
    """bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%; float16: 11 bits); through
    2 layers the first token's log-probabilities stay within 0.05 nats of transformers'
    run in the same dtype. On CPUs without native 16-bit GEMMs the linear layers take
    vllm._C's lowp_linear (float32 sums, rounded once), torch's emulation in transformers."""
    path = make_model("llama", str(tmp_path / "m"), vocab_size=1000)
    prompts = random_prompts(4, 1000)
    hf_tokens, _ = hf_greedy(path, prompts, 1, dtype=dtype)
    _, hf_lp = hf_greedy(path, prompts, 1, dtype=dtype)
    llm = LLM(model=path, dtype=str(dtype).removeprefix("torch."))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=5)
    for out, ref_tok, ref_lp in zip(
        llm.generate(prompts, params, use_tqdm=False), hf_tokens, hf_lp
    ):
        comp = out.outputs[0]
        for token_id, lp in comp.logprobs[0].items():
            assert lp.logprob == pytest.approx(ref_lp[token_id].item(), abs=0.05)
        assert comp.token_ids == ref_tok


def test_layers_share_one_rotary_table():
    # One cos/sin table per distinct rope setting, not one per layer: a model of many
    # layers would otherwise hold max_position x rotary_dim x 4 bytes in each.
    from transformers import LlamaConfig

    from vllm.model_executor.models.llama import LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    config = LlamaConfig(**shape)
    model = LlamaForCausalLM(config)
    tables = {layer.self_attn.rotary_emb.cos_sin_cache.data_ptr() for layer in model.model.layers}
    assert len(tables) == 1
    other = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500.0))
    assert (
        other.model.layers[0].self_attn.rotary_emb is not model.model.layers[0].self_attn.rotary_emb
    )
