"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded to a multiple of ``64 * tp_size`` so every rank holds the
same number of rows whatever the vocab size (GPT-2's 50257 included); the padded
logits are dropped before sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.cpu_linear import (
    linear,
    onednn_packing_enabled,
    pack_linear_weight,
    packed_copy,
)
from vllm.model_executor.layers.shard_spec import Segment, ShardSpec
from vllm.model_executor.utils import LoadedWeight, copy_weight, narrow_weight, set_weight_attrs

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int) -> int:
    return (vocab_size + pad_to - 1) // pad_to * pad_to


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype=None,
        padding_size: int = DEFAULT_VOCAB_PADDING_SIZE,
    ):
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.org_vocab_size = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.embedding_dim = embedding_dim
        # Vocabulary rows, padded as above; the LM head's bias splits the same way.
        self.vocab_shard_spec = ShardSpec(0, (Segment(num_embeddings, pad_multiple=padding_size),))
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition,
                embedding_dim,
                dtype=params_dtype or torch.get_default_dtype(),
            ),
            requires_grad=False,
        )
        set_weight_attrs(
            self.weight,
            {
                "weight_loader": self.weight_loader,
                "output_dim": 0,
                "org_size": num_embeddings,
                "shard_spec": self.vocab_shard_spec,
            },
        )

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        # Rows past the real vocabulary (padding) stay zero.
        start = self.vocab_start_index
        n = max(0, min(self.vocab_end_index, self.org_vocab_size) - start)
        param.data[n:].zero_()
        copy_weight(param.data[:n], narrow_weight(loaded_weight, 0, start, n, self.org_vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(mask, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded by vocabulary rows; may share the embedding's weight."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype=None,
        padding_size: int = DEFAULT_VOCAB_PADDING_SIZE,
    ):
        super().__init__(num_embeddings, embedding_dim, params_dtype, padding_size)
        # As LinearBase.repacks_weights; a tied head keeps the embedding's layout.
        self.repacks_weights = onednn_packing_enabled(self.weight.dtype, torch.get_default_device())
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition, dtype=self.weight.dtype),
                requires_grad=False,
            )
            set_weight_attrs(
                self.bias,
                {
                    "weight_loader": self.weight_loader,
                    "output_dim": 0,
                    "shard_spec": self.vocab_shard_spec,
                },
            )
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> ParallelLMHead:
        self.weight = embed_tokens.weight
        self.tied = True
        self.repacks_weights = False
        return self

    def process_weights_after_loading(self) -> None:
        # A tied weight is also the embedding table, which needs the plain layout: the
        # head multiplies a packed copy of it instead (as upstream's CPU backend does),
        # outside the state dict so saved checkpoints are unchanged.
        if not getattr(self, "tied", False):
            pack_linear_weight(self)
        elif onednn_packing_enabled(self.weight.dtype, self.weight.device):
            self.packed_weight = packed_copy(self.weight)

    @property
    def gemm_weight(self) -> torch.Tensor:
        """The weight the logits are computed with (a tied head's packed copy)."""
        packed = getattr(self, "packed_weight", None)
        return self.weight if packed is None else packed

    def forward(self, input_):
        raise RuntimeError("LM head weights are used through LogitsProcessor, not called.")


class LogitsProcessor(nn.Module):
    """hidden states -> full-vocabulary logits (padding removed), float32."""

    def __init__(self, vocab_size: int, scale: float = 1.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale

    def forward(self, lm_head: ParallelLMHead, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, lm_head.gemm_weight, lm_head.bias)
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        logits = logits[..., : self.vocab_size].float()
        if self.scale != 1.0:
            logits *= self.scale
        return logits
