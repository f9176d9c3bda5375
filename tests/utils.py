"""Helpers to compare this engine with Hugging Face transformers on tiny random models."""

from __future__ import annotations

import random

import torch


def device_for(tp: int = 1) -> str:
    """Where the tests run an engine of ``tp`` ranks: on CUDA where this machine has a GPU
    per rank (so a GPU machine runs the CUDA paths), else on the CPU (``gloo``)."""
    return "cuda" if torch.cuda.device_count() >= tp else "cpu"


def random_prompts(
    num: int, vocab_size: int, min_len: int = 3, max_len: int = 24, seed: int = 0
) -> list[list[int]]:
    """Token-id prompts of different lengths (ids 2.. avoid BOS/EOS of the test tokenizer)."""
    rng = random.Random(seed)
    lengths = [min_len + (i * (max_len - min_len)) // max(1, num - 1) for i in range(num)]
    rng.shuffle(lengths)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(
    model_dir: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and the last step's log-probabilities from transformers, per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # Like ignore_eos: generate exactly max_new_tokens without banning EOS (min_new_tokens
    # would ban it and change the argmax where the model prefers EOS).
    model.generation_config.eos_token_id = None
    tokens, last_logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            last_logprobs.append(out.logits[-1][0].float().log_softmax(-1))
    return tokens, last_logprobs
