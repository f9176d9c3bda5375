"""Write tiny Hugging Face models as GGUF files, as llama.cpp's converter does, and the
Hugging Face model those files decode to (the reference the engine is compared with)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import load_file

# Hugging Face name pieces -> llama.cpp's (convert_hf_to_gguf's tensor map for llama/qwen2).
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def gguf_name(hf: str) -> str:
    module, kind = hf.rsplit(".", 1)
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_LAYER[rest]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: interleave each head's two rotary halves."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    return float(theta if theta is not None else config.rope_parameters["rope_theta"])


def write_gguf(
    hf_dir: str,
    out: str,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    with_tokenizer: bool = False,
    arch: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip: tuple[str, ...] = (),
) -> str:
    """Convert ``hf_dir`` (a llama or qwen2 made by ``vllm.testing.make_model``) to ``out``:
    matrices in ``qtype``, vectors in F32 (llama.cpp keeps norms and biases in F32).
    ``extra_tensors`` are added and the GGUF names in ``skip`` left out (broken files)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    gguf_arch = arch or {"mistral": "llama"}.get(config.model_type, config.model_type)
    n_kv = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    w = GGUFWriter(out, gguf_arch)
    w.add_name("tiny test model")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)
    if with_tokenizer:
        _add_tokenizer(w, hf_dir, config.vocab_size)
    for name, tensor in state.items():
        if gguf_name(name) in skip:
            continue
        data = tensor.float().numpy()
        if gguf_arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif gguf_arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, n_kv)
        if data.ndim == 2 and qtype != GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantized_reference(hf_dir: str, out_dir: str, qtype: GGMLQuantizationType) -> str:
    """``hf_dir`` with every matrix replaced by dequantize(quantize(.)), the values a GGUF
    file of ``qtype`` holds (the Q/K permutation moves whole rows, so it commutes with the
    row-wise blocks), saved with ``save_pretrained`` for transformers to run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                q = quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(quants.dequantize(q, qtype)))
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_dir, f), out_dir)
    return out_dir


def _add_tokenizer(w: GGUFWriter, hf_dir: str, vocab_size: int) -> None:
    """The byte-level BPE of ``hf_dir`` as llama.cpp writes a "gpt2" tokenizer, padded to
    the model's vocabulary with unused tokens."""
    spec = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED
    for token, i in spec["model"]["vocab"].items():
        tokens[i], types[i] = token, 1  # NORMAL
    for added in spec["added_tokens"]:
        types[added["id"]] = 3  # CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
