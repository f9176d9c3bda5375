"""What a GGUF file (llama.cpp's single-file checkpoint) means to the engine's configs.

A ``.gguf`` file has no directory of its own: its metadata is the config, its tokenizer
fields are the tokenizer. transformers reads both (``gguf_file=``); this module says where
to point it and fills in what it leaves out. No vLLM imports: ``vllm.config`` uses it.
"""

from __future__ import annotations

import os
from typing import Any

GGUF_MAGIC = b"GGUF"

# transformers' model_type for a GGUF file -> the architecture the engine builds. These
# are the ones whose tensor names the gguf loader maps (llama.cpp calls a Mistral "llama").
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A file named ``*.gguf``, or any file that starts with GGUF's magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_location(path: str) -> tuple[str, dict[str, str]]:
    """``(directory, {"gguf_file": name})``: how transformers' ``from_pretrained`` takes a
    GGUF file (a directory plus the file's name in it)."""
    path = os.path.abspath(path)
    return os.path.dirname(path), {"gguf_file": os.path.basename(path)}


def load_gguf_config(path: str, trust_remote_code: bool = False) -> Any:
    """The transformers config that ``path``'s metadata describes, with ``architectures``
    set (transformers leaves it empty for a GGUF file) so the engine can pick the model.

    ``tie_word_embeddings`` comes from transformers: true when the file has no
    ``output.weight`` (llama.cpp drops the LM head of a tied model).
    """
    from transformers import AutoConfig

    directory, kwargs = gguf_location(path)
    try:
        config = AutoConfig.from_pretrained(
            directory, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad files
        raise ValueError(
            f"Could not read a config from the GGUF file {path!r}: {e}. Supported GGUF "
            f"architectures: {', '.join(GGUF_ARCHITECTURES)}."
        ) from e
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"The GGUF file {path!r} holds a {model_type!r} model, which the gguf loader "
            f"cannot map to this engine's layers; supported: {', '.join(GGUF_ARCHITECTURES)}."
        )
    config.architectures = [GGUF_ARCHITECTURES[model_type]]
    return config


def gguf_generation_config(hf_config: Any) -> dict[str, Any]:
    """Generation defaults of a GGUF model, which ships no ``generation_config.json``: the
    special token ids of its metadata, as upstream's ``GenerationConfig.from_model_config``."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: getattr(hf_config, k) for k in keys if getattr(hf_config, k, None) is not None}
