"""``load_format="gguf"``: a llama.cpp ``.gguf`` file, dequantized to the model's dtype.

The file's tensors carry llama.cpp's names (``blk.0.attn_q.weight``); they are renamed to
the Hugging Face names the model's ``load_weights`` expects and handed over as lazy
``GGUFTensor`` views, so each rank's ``weight_loader`` decodes only its own slice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from torch import nn

from vllm.config import LoadConfig, VllmConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.gguf.tensor import GGUFTensor
from vllm.model_executor.model_loader.safetensors.reader import ReadStats
from vllm.transformers_utils.gguf_utils import is_gguf
from vllm.utils import gc_paused

# general.architecture -> whether llama.cpp's converter permuted the rows of attn_q/attn_k
# (and their biases) within each head, to interleave the two rotary halves. Qwen2 uses
# the rotate-half layout in llama.cpp too, so its rows are stored as in Hugging Face.
_ARCH_PERMUTES_QK = {"llama": True, "qwen2": False}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama-family GGUF tensor; None for a name not mapped."""
    if m := _LAYER_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (m := _GLOBAL_RE.fullmatch(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """For each Hugging Face row of a Q or K projection, its row in the GGUF file.

    llama.cpp stores each head's rows as (i, half) pairs interleaved, row 2*i + j holding
    Hugging Face row j*d/2 + i of that head (d = head size). The map stays inside a head,
    so a rank's whole heads come from its own rows of the file.
    """
    if num_rows % (2 * num_heads):
        raise ValueError(
            f"Cannot undo llama.cpp's Q/K permutation of {num_rows} rows over {num_heads} "
            "heads: the rows must split into heads of an even size."
        )
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def gguf_string(reader: GGUFReader, key: str) -> str | None:
    """A string field of the metadata, e.g. ``general.architecture``."""
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_weights_iterator(
    reader: GGUFReader, hf_config: Any, dtype: torch.dtype, stats: ReadStats | None = None
) -> Iterator[tuple[str, GGUFTensor]]:
    """Yield (Hugging Face name, lazy view) for every tensor of the file.

    Raises before yielding anything if a name is not one the loader maps or a tensor's
    type cannot be dequantized, so a bad file fails before any weight is read.
    """
    arch = gguf_string(reader, "general.architecture")
    if arch not in _ARCH_PERMUTES_QK:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported by the gguf loader; supported: "
            f"{', '.join(_ARCH_PERMUTES_QK)}."
        )
    permute = _ARCH_PERMUTES_QK[arch]
    heads = {
        "q_proj": hf_config.num_attention_heads,
        "k_proj": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
    }
    views: list[tuple[str, GGUFTensor]] = []
    unknown: list[str] = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims inner-first
        rows = None
        proj = name.split(".")[-2]
        if permute and proj in heads:
            rows = unpermute_rows(shape[0], heads[proj])
        views.append((name, GGUFTensor(t.name, t.tensor_type, t.data, shape, dtype, stats, rows)))
    if unknown:
        hint = ""
        if "rope_freqs.weight" in unknown:
            hint = (
                " rope_freqs.weight holds Llama 3.1-style RoPE frequency factors, which the "
                "config read from a GGUF file does not carry; such files are not supported."
            )
        raise ValueError(
            f"The GGUF file has {len(unknown)} tensor(s) the gguf loader does not map to "
            f"{arch!r} model weights: {', '.join(unknown[:20])}"
            f"{' ...' if len(unknown) > 20 else ''}.{hint}"
        )
    yield from views


def _biases_from_tensors(hf_config: Any, reader: GGUFReader) -> None:
    """A llama file may carry attention/MLP biases (llama.cpp loads them when present) that
    transformers' GGUF config does not record: the tensors decide, before the model is built."""
    if gguf_string(reader, "general.architecture") != "llama":
        return
    names = {t.name for t in reader.tensors}
    hf_config.attention_bias = "blk.0.attn_q.bias" in names
    hf_config.mlp_bias = "blk.0.ffn_up.bias" in names


class GGUFModelLoader(BaseModelLoader):
    """Reads ``model=<file>.gguf``; quantized tensors are dequantized with gguf-py's numpy
    codecs into the model's dtype, only the rows and quant blocks of this rank's slice."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self._reader: GGUFReader | None = None  # opened by build_model, read by load_weights
        if load_config.model_loader_extra_config:
            keys = ", ".join(sorted(load_config.model_loader_extra_config))
            raise ValueError(
                f"model_loader_extra_config keys {keys} are not used by load_format='gguf'."
            )

    def build_model(self, vllm_config: VllmConfig) -> nn.Module:
        """Open the file first: its tensors decide part of the config (biases)."""
        path = vllm_config.model_config.model
        if not is_gguf(path):
            raise ValueError(
                f"load_format='gguf' reads one .gguf file, but model={path!r} is not one; "
                "pass the path of the .gguf file itself."
            )
        self._reader = GGUFReader(path)  # memory-mapped; views read pages on demand
        _biases_from_tensors(vllm_config.model_config.hf_config, self._reader)
        return super().build_model(vllm_config)

    def load_weights(self, model: nn.Module, vllm_config: VllmConfig) -> set[str]:
        """Fill ``model``'s parameters (this rank's slices) from the GGUF file."""
        start = time.perf_counter()
        mc = vllm_config.model_config
        reader, self._reader = self._reader or GGUFReader(mc.model), None
        stats = ReadStats()
        weights = gguf_weights_iterator(reader, mc.hf_config, mc.dtype, stats)
        with torch.no_grad(), gc_paused():
            loaded = model.load_weights(weights)
        self.report_weights_loaded(start, stats.bytes_read)
        return loaded
