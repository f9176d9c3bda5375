"""OPT: learned positions, LayerNorm before (most sizes) or after (OPT-350m) each block."""

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
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    LogitsProcessor,
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import load_weights_by_name
from vllm.model_executor.utils import LoadedWeight


class OPTLearnedPositionalEmbedding(nn.Embedding):
    # OPT's position table starts at row 2 (rows 0-1 are a fairseq padding legacy), so
    # position p reads row p + 2 and the table has max_position_embeddings + 2 rows.
    offset = 2

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings + self.offset, embedding_dim)
        self.weight.requires_grad_(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.offset)


class OPTAttention(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        embed_dim = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.head_dim = embed_dim // self.total_num_heads
        self.qkv_proj = QKVParallelLinear(
            embed_dim,
            self.head_dim,
            self.total_num_heads,
            bias=config.enable_bias,
            quant_config=quant_config,
        )
        self.out_proj = RowParallelLinear(
            embed_dim, embed_dim, bias=config.enable_bias, quant_config=quant_config
        )
        self.num_heads = self.total_num_heads // tp_size
        self.q_size = self.qkv_proj.q_size
        # transformers multiplies q by head_dim**-0.5 after q_proj; same result as the scale.
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.do_layer_norm_before = config.do_layer_norm_before
        affine = config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, quant_config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, config.ffn_dim, bias=config.enable_bias, quant_config=quant_config
        )
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(
            config.ffn_dim, config.hidden_size, bias=config.enable_bias, quant_config=quant_config
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pre_ln = self.do_layer_norm_before
        residual = hidden_states
        if pre_ln:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states)
        if not pre_ln:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if pre_ln:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if not pre_ln:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        proj_dim = config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
        self.embed_positions = OPTLearnedPositionalEmbedding(
            config.max_position_embeddings, config.hidden_size
        )
        # Smaller word embeddings than the hidden size (OPT-350m) are projected in and out.
        if proj_dim != config.hidden_size:
            self.project_in = ReplicatedLinear(
                proj_dim, config.hidden_size, bias=False, quant_config=quant_config
            )
            self.project_out = ReplicatedLinear(
                config.hidden_size, proj_dim, bias=False, quant_config=quant_config
            )
        else:
            self.project_in = self.project_out = None
        # Post-LN models (do_layer_norm_before=False) normalise inside each layer only.
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = nn.LayerNorm(
                config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine
            )
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, quant_config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)
        hidden_states = hidden_states + self.embed_positions(positions)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.decoder = OPTDecoder(config, quant_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, positions)


class OPTForCausalLM(nn.Module):
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ]

    def __init__(self, config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        self.model = OPTModel(config, quant_config)
        # The LM head reads word_embed_proj_dim features (after project_out).
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_weights(self.model.decoder.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        tied = getattr(self.config, "tie_word_embeddings", True)

        def rename(name: str) -> str | None:
            if tied and name == "lm_head.weight":
                return None
            if name.startswith("decoder."):  # original facebook/opt-* checkpoints lack "model."
                name = "model." + name
            return name

        return load_weights_by_name(self, weights, self.stacked_params_mapping, rename)
