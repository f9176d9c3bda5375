"""Small random-weight Hugging Face checkpoints built locally (nothing is downloaded).

Used by the tests, the benchmarks and the README's demo: ``make_model("llama", path)``
writes a config, safetensors weights and a byte-level BPE tokenizer to ``path``.
"""

from __future__ import annotations

import os
from typing import Any

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, this is a small engine "
    "that runs large language models. Paged attention keeps the cache in blocks; "
    "continuous batching admits new requests every step. San Francisco is a city in "
    "California. The future of AI is open, fast and measured. Once upon a time there was "
    "a model that generated text one token at a time, 0123456789."
)

# Llama, Qwen2 and Mistral share one code path; their cases differ in KV heads and details.
_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Tiny, fast shapes per architecture; each config exercises that family's quirks.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_SHAPE, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
        do_layer_norm_before=True,
    ),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True),
    # Same code path as Llama, different checkpoint details (q/k/v biases, sliding window).
    "qwen2": dict(_LLAMA_SHAPE, num_key_value_heads=2),
    "mistral": dict(_LLAMA_SHAPE, num_key_value_heads=1, sliding_window=None),
}

# A ~100M-parameter Llama for the throughput benchmark and the demo.
LLAMA_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def make_tokenizer(path: str, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer (<= vocab_size tokens) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_config(arch: str, vocab_size: int = 512, **overrides: Any):
    import transformers

    classes = {
        "llama": "LlamaConfig",
        "gpt2": "GPT2Config",
        "gpt_neox": "GPTNeoXConfig",
        "opt": "OPTConfig",
        "gpt_bigcode": "GPTBigCodeConfig",
        "qwen2": "Qwen2Config",
        "mistral": "MistralConfig",
    }
    if arch not in classes:
        raise ValueError(f"Unknown arch {arch!r}; choose from {', '.join(classes)}.")
    kwargs = {
        **TINY_CONFIGS[arch],
        "vocab_size": vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        **overrides,
    }
    if arch == "opt":
        kwargs.setdefault("pad_token_id", 1)
    return getattr(transformers, classes[arch])(**kwargs)


def make_model(
    arch: str,
    path: str,
    vocab_size: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    init_std: float = 0.1,
    **overrides: Any,
) -> str:
    """Save a random ``arch`` model (and tokenizer) to ``path``; returns ``path``.

    ``init_std`` larger than Hugging Face's 0.02 makes the next-token distribution
    peaked, so greedy decoding is not decided by rounding noise.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(arch, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init_std)
            elif "bias" in name:
                p.normal_(0.0, init_std)
    model = model.to(getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer(path, min(vocab_size, 512))
    return path
