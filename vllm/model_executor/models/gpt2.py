"""GPT-2: learned absolute positions, pre-LayerNorm blocks, Conv1D checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vllm.attention import Attention
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    LogitsProcessor,
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import load_weights_by_name
from vllm.model_executor.utils import LoadedWeight, materialize

_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config: QuantizationConfig | None = None):
        super().__init__()
        hidden_size = config.hidden_size
        total_num_heads = config.num_attention_heads
        self.head_dim = hidden_size // total_num_heads
        self.c_attn = QKVParallelLinear(
            hidden_size, self.head_dim, total_num_heads, bias=True, quant_config=quant_config
        )
        self.c_proj = RowParallelLinear(
            hidden_size, hidden_size, bias=True, quant_config=quant_config
        )
        self.num_heads = self.c_attn.num_heads  # total_num_heads // tp_size
        self.q_size = self.c_attn.q_size
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = Attention(self.num_heads, self.head_dim, scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(
        self, intermediate_size: int, config, quant_config: QuantizationConfig | None = None
    ):
        super().__init__()
        self.c_fc = ColumnParallelLinear(
            config.hidden_size, intermediate_size, bias=True, quant_config=quant_config
        )
        self.c_proj = RowParallelLinear(
            intermediate_size, config.hidden_size, bias=True, quant_config=quant_config
        )
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config: QuantizationConfig | None = None):
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = getattr(config, "n_inner", None) or 4 * hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, quant_config)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config, quant_config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(
            GPT2Block(config, i, quant_config) for i in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        self.tied = getattr(config, "tie_word_embeddings", True)
        self.transformer = GPT2Model(config, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tied:
            self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        def transposed(
            weights: Iterable[tuple[str, LoadedWeight]],
        ) -> Iterator[tuple[str, LoadedWeight]]:
            for name, weight in weights:
                if name.endswith(_CONV1D_WEIGHTS):
                    # HF GPT-2 stores these as Conv1D, [in, out]; our linear layers hold [out, in].
                    weight = materialize(weight).t()
                yield name, weight

        def rename(name: str) -> str | None:
            # Causal-mask buffers saved by old transformers versions are not parameters.
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                return None
            if name.startswith("lm_head."):
                return None if self.tied else name
            # The original OpenAI checkpoints on the Hub name weights without "transformer.".
            return name if name.startswith("transformer.") else "transformer." + name

        return load_weights_by_name(self, transposed(weights), rename=rename)
