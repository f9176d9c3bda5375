"""GPTBigCode (SantaCoder, StarCoder): GPT-2's layout with multi-query attention."""

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


class GPTBigCodeAttention(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        hidden_size = config.hidden_size
        total_num_heads = config.num_attention_heads
        # multi_query: one KV head shared by all query heads, replicated on every rank.
        total_num_kv_heads = 1 if config.multi_query else total_num_heads
        self.head_dim = hidden_size // total_num_heads
        self.c_attn = QKVParallelLinear(
            hidden_size,
            self.head_dim,
            total_num_heads,
            total_num_kv_heads,
            bias=True,
            quant_config=quant_config,
        )
        self.c_proj = RowParallelLinear(
            hidden_size, hidden_size, bias=True, quant_config=quant_config
        )
        self.num_heads = self.c_attn.num_heads  # total_num_heads // tp_size
        self.num_kv_heads = self.c_attn.num_kv_heads
        self.q_size = self.c_attn.q_size
        self.kv_size = self.c_attn.kv_size
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPTBigCodeMLP(nn.Module):
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


class GPTBigCodeBlock(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = getattr(config, "n_inner", None) or 4 * hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(config, quant_config)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(inner_dim, config, quant_config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPTBigCodeModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(
            GPTBigCodeBlock(config, quant_config) for _ in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPTBigCodeForCausalLM(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        self.tied = getattr(config, "tie_word_embeddings", True)
        self.transformer = GPTBigCodeModel(config, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tied:
            self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        num_heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // num_heads

        def regrouped(
            weights: Iterable[tuple[str, LoadedWeight]],
        ) -> Iterator[tuple[str, LoadedWeight]]:
            for name, weight in weights:
                if not self.config.multi_query and name.endswith(
                    (".c_attn.weight", ".c_attn.bias")
                ):
                    # HF's multi-head c_attn rows go per head [q_h; k_h; v_h]; regroup to [q; k; v].
                    weight = materialize(weight).unflatten(0, (num_heads, 3, head_dim))
                    weight = weight.transpose(0, 1).flatten(0, 2)
                yield name, weight

        def rename(name: str) -> str | None:
            # Causal-mask buffers saved by old transformers versions are not parameters.
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                return None
            if name.startswith("lm_head."):
                return None if self.tied else name
            return name

        return load_weights_by_name(self, regrouped(weights), rename=rename)
