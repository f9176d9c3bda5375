"""GPT-NeoX (Pythia, GPT-NeoX-20B): partial rotary, LayerNorm, parallel or sequential residual."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.attention import Attention
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    LogitsProcessor,
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import load_weights_by_name
from vllm.model_executor.utils import LoadedWeight, materialize


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.total_num_heads
        bias = getattr(config, "attention_bias", True)
        self.query_key_value = QKVParallelLinear(
            config.hidden_size,
            self.head_size,
            self.total_num_heads,
            bias=bias,
            quant_config=quant_config,
        )
        self.dense = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=bias, quant_config=quant_config
        )
        self.num_heads = self.total_num_heads // tp_size
        self.q_size = self.query_key_value.q_size
        self.rotary_emb = get_rope(config, self.head_size, config.max_position_embeddings)
        self.attn = Attention(self.num_heads, self.head_size, self.head_size**-0.5)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.query_key_value(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, quant_config=quant_config
        )
        self.dense_4h_to_h = RowParallelLinear(
            config.intermediate_size, config.hidden_size, quant_config=quant_config
        )
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, quant_config)
        self.mlp = GPTNeoXMLP(config, quant_config)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_output = self.attention(positions, self.input_layernorm(hidden_states))
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x))
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return mlp_output + attn_output + hidden_states
        # x = x + attn(ln1(x)); x = x + mlp(ln2(x))
        attn_output = attn_output + hidden_states
        return self.mlp(self.post_attention_layernorm(attn_output)) + attn_output


class GPTNeoXModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(config, quant_config) for _ in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config, quant_config)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.embed_out.tie_weights(self.gpt_neox.embed_in)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.embed_out, hidden_states)

    def _qkv_to_q_k_v(self, weight: LoadedWeight) -> torch.Tensor:
        # The checkpoint's fused rows are per head [h0 q,k,v; h1 q,k,v; ...]; regroup them
        # to [all q; all k; all v], the layout QKVParallelLinear shards by "q"/"k"/"v".
        weight = materialize(weight)
        num_heads = self.config.num_attention_heads
        shape = weight.shape
        return weight.view(num_heads, 3, -1, *shape[1:]).transpose(0, 1).reshape(shape)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        tied = getattr(self.config, "tie_word_embeddings", False)

        def convert(weights: Iterable[tuple[str, LoadedWeight]]):
            for name, weight in weights:
                if ".attention.query_key_value." in name:
                    weight = self._qkv_to_q_k_v(weight)
                yield name, weight

        def rename(name: str) -> str | None:
            # Causal-mask and rotary buffers saved by old transformers versions.
            if name.endswith((".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")):
                return None
            if name == "lm_head.weight":  # transformers >= 5 calls embed_out lm_head
                name = "embed_out.weight"
            if tied and name == "embed_out.weight":
                return None
            return name

        return load_weights_by_name(self, convert(weights), rename=rename)
