"""Tensor-parallel linear layers.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that
takes the full checkpoint tensor (or a lazy slice of it) and copies in this rank's
part, and a ``shard_spec`` (``shard_spec.ShardSpec``) stating that same sharding as
data, for the sharded-state saver and the resharder. The layer is the one place that
knows how a tensor is sharded.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.cpu_linear import linear, onednn_packing_enabled, pack_linear_weight
from vllm.model_executor.layers.quantization import LinearMethodBase, QuantizationConfig
from vllm.model_executor.layers.shard_spec import Segment, ShardSpec
from vllm.model_executor.utils import (
    LoadedWeight,
    check_size,
    copy_weight,
    narrow_weight,
    set_weight_attrs,
    weight_shape,
)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} {numerator} is not divisible by tensor_parallel_size={denominator}."
        )
    return numerator // denominator


class UnquantizedLinearMethod(LinearMethodBase):
    """The weight in the model's dtype; on the CPU repacked for oneDNN where that is
    faster (``cpu_linear``)."""

    def __init__(self, params_dtype: torch.dtype) -> None:
        self.params_dtype = params_dtype
        self.repacks_weights = onednn_packing_enabled(params_dtype, torch.get_default_device())

    def create_weights(
        self, layer: nn.Module, out_features: int, in_features: int, weight_attrs, spec
    ) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=self.params_dtype), requires_grad=False
        )
        set_weight_attrs(layer.weight, {"shard_spec": spec, **weight_attrs})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pack_linear_weight(layer)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.quant_method: LinearMethodBase = (
            UnquantizedLinearMethod(self.params_dtype)
            if quant_config is None
            else quant_config.get_linear_method(self.params_dtype)
        )
        # Whether process_weights_after_loading gives the weight new memory (the loader
        # then reads into the parameters instead of laying them out as the file).
        self.repacks_weights = self.quant_method.repacks_weights

    def _make_params(
        self,
        out_features: int,
        in_features: int,
        bias: bool,
        attrs: dict,
        spec: ShardSpec,
        bias_spec: ShardSpec,
    ) -> None:
        """``spec``/``bias_spec``: how the weight and the bias are sharded."""
        self.quant_method.create_weights(
            self, out_features, in_features, {"weight_loader": self.weight_loader, **attrs}, spec
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=self.params_dtype), requires_grad=False
            )
            bias_attrs = {k: v for k, v in attrs.items() if k == "output_dim"}
            set_weight_attrs(
                self.bias,
                {"weight_loader": self.weight_loader, "shard_spec": bias_spec, **bias_attrs},
            )
        else:
            self.register_parameter("bias", None)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)


class ReplicatedLinear(LinearBase):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__(input_size, output_size, bias, params_dtype, quant_config)
        replicated = ShardSpec.replicated()
        self._make_params(output_size, input_size, bias, {}, replicated, replicated)

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        copy_weight(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by columns (output features) across ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__(input_size, output_size, bias, params_dtype, quant_config)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size, "output size")
        spec = ShardSpec(0, self.output_segments())  # the bias splits like the weight
        self._make_params(
            self.output_size_per_partition,
            input_size,
            bias,
            {"output_dim": 0, "input_dim": 1},
            spec,
            spec,
        )

    def output_segments(self) -> tuple[Segment, ...]:
        """The global output rows, in the order each rank holds its part of them."""
        return (Segment(self.output_size),)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: LoadedWeight, shard_id=None
    ) -> None:
        shard = param.data.shape[0]
        src = narrow_weight(loaded_weight, 0, self.tp_rank * shard, shard, shard * self.tp_size)
        copy_weight(param.data, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (e.g. gate_up_proj).

    Each rank holds its slice of every output, in order: ``[gate_r; up_r]``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = False,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        self.output_sizes = list(output_sizes)
        super().__init__(
            input_size, sum(output_sizes), bias, gather_output, params_dtype, quant_config
        )

    def output_segments(self) -> tuple[Segment, ...]:
        return tuple(Segment(size) for size in self.output_sizes)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: LoadedWeight, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # the checkpoint already holds the outputs concatenated
            check_size(loaded_weight, 0, sum(self.output_sizes))
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, narrow_weight(loaded_weight, 0, offset, size), i)
                offset += size
            return
        local = [divide(s, self.tp_size, "output size") for s in self.output_sizes]
        start = sum(local[:shard_id])
        dst = param.data.narrow(0, start, local[shard_id])
        src = narrow_weight(
            loaded_weight,
            0,
            self.tp_rank * local[shard_id],
            local[shard_id],
            self.output_sizes[shard_id],
        )
        copy_weight(dst, src)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; each rank holds ``[q_r; k_r; v_r]`` rows.

    When there are fewer KV heads than ranks, KV heads are replicated: rank r
    holds KV head ``r // (tp_size // total_num_kv_heads)``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        tp_size = get_tensor_model_parallel_world_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= self.total_num_kv_heads:
            divide(tp_size, self.total_num_kv_heads, "tensor_parallel_size")
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp_size // self.total_num_kv_heads
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, False, params_dtype, quant_config)

    def output_segments(self) -> tuple[Segment, ...]:
        # Whole heads per rank; KV heads replicated when ranks outnumber them.
        kv = Segment(self.total_num_kv_heads * self.head_size, self.head_size, replicate=True)
        return (Segment(self.total_num_heads * self.head_size, self.head_size), kv, kv)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: LoadedWeight, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # checkpoint holds [q; k; v] contiguously (e.g. GPTBigCode c_attn)
            total_q = self.total_num_heads * self.head_size
            total_kv = self.total_num_kv_heads * self.head_size
            check_size(loaded_weight, 0, total_q + 2 * total_kv)
            for sid, offset, size in (
                ("q", 0, total_q),
                ("k", total_q, total_kv),
                ("v", total_q + total_kv, total_kv),
            ):
                self.weight_loader(param, narrow_weight(loaded_weight, 0, offset, size), sid)
            return
        if shard_id == "q":
            dst_start, size, src_start = 0, self.q_size, self.tp_rank * self.q_size
            full = self.total_num_heads * self.head_size
        elif shard_id in ("k", "v"):
            kv_rank = self.tp_rank // self.num_kv_head_replicas
            dst_start = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, src_start = self.kv_size, kv_rank * self.kv_size
            full = self.total_num_kv_heads * self.head_size
        else:
            raise ValueError(f"Unknown shard_id {shard_id!r} for QKVParallelLinear.")
        src = narrow_weight(loaded_weight, 0, src_start, size, full)
        copy_weight(param.data.narrow(0, dst_start, size), src)


class RowParallelLinear(LinearBase):
    """Y = X A with A split by rows (input features); partial results are summed."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        params_dtype=None,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__(input_size, output_size, bias, params_dtype, quant_config)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        self._make_params(
            output_size,
            self.input_size_per_partition,
            False,
            {"output_dim": 0, "input_dim": 1},
            ShardSpec(1, (Segment(input_size),)),
            ShardSpec.replicated(),
        )
        if bias:  # added once, after the reduction: every rank holds all of it
            self.bias = nn.Parameter(
                torch.empty(output_size, dtype=self.params_dtype), requires_grad=False
            )
            set_weight_attrs(
                self.bias,
                {"weight_loader": self.weight_loader, "shard_spec": ShardSpec.replicated()},
            )

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        if param is self.bias or len(weight_shape(loaded_weight)) == 1:
            copy_weight(param.data, loaded_weight)
            return
        shard = param.data.shape[1]
        src = narrow_weight(loaded_weight, 1, self.tp_rank * shard, shard, shard * self.tp_size)
        copy_weight(param.data, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
