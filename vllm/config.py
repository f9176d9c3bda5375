"""Engine configuration: one dataclass per concern, validated where it is built."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.logger import init_logger
from vllm.transformers_utils.gguf_utils import is_gguf, load_gguf_config

logger = init_logger(__name__)

_STR_TO_DTYPE = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "sharded_state", "gguf")


def _resolve_dtype(dtype: str | torch.dtype, hf_config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = dtype.lower()
    if dtype == "auto":
        # transformers >= 4.56 names it dtype (and warns on reading torch_dtype).
        key = "dtype" if hasattr(hf_config, "dtype") else "torch_dtype"
        cfg_dtype = getattr(hf_config, key, None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = _STR_TO_DTYPE.get(cfg_dtype, torch.float32)
        if cfg_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            cfg_dtype = torch.float32
        return cfg_dtype
    if dtype not in _STR_TO_DTYPE:
        raise ValueError(
            f"Unknown dtype {dtype!r}; use one of 'auto', {', '.join(map(repr, _STR_TO_DTYPE))}."
        )
    return _STR_TO_DTYPE[dtype]


@dataclass
class ModelConfig:
    model: str
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    revision: str | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    # The method's parameters (e.g. deepspeedfp's group_size; default: the model config's
    # quantization_config for that method) and whether the checkpoint holds quantized
    # weights already (a sharded_state save of a quantized engine).
    quantization_params: dict[str, Any] | None = None
    quantized_checkpoint: bool = False
    enforce_eager: bool = False
    max_logprobs: int = 20
    # Where sampling defaults come from: 'auto' (the model's generation_config.json), 'vllm'
    # (none) or a directory; override_generation_config is laid over them.
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    hf_config: Any = field(default=None, repr=False)
    quant_config: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.model
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(
            self.generation_config
        ):
            raise ValueError(
                f"generation_config={self.generation_config!r} is not a directory; pass "
                "'auto' (the model's generation_config.json), 'vllm' (upstream's defaults) or "
                "a directory that holds a generation_config.json."
            )
        if self.hf_config is None:
            self.hf_config = _load_hf_config(self.model, self.trust_remote_code, self.revision)
        self.dtype = _resolve_dtype(self.dtype, self.hf_config)
        if self.quantization == "gguf" and is_gguf(self.model):
            # Upstream runs GGUF's quantized kernels; here the loader dequantizes to dtype.
            logger.info("GGUF weights are dequantized to %s as they load.", self.dtype)
            self.quantization = None
        if self.quantization is not None:
            from vllm.model_executor.layers.quantization import get_quantization_config

            self.quant_config = get_quantization_config(
                self.quantization, self._quantization_params(), self.quantized_checkpoint
            )
        derived = self._derived_max_model_len()
        if self.max_model_len is None:
            self.max_model_len = derived
        elif self.max_model_len > derived:
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the model's maximum "
                f"context length {derived} (from its config); use a value <= {derived}."
            )
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")

    def _quantization_params(self) -> dict[str, Any]:
        if self.quantization_params is not None:
            return self.quantization_params
        hf_params = getattr(self.hf_config, "quantization_config", None) or {}
        if isinstance(hf_params, dict) and hf_params.get("quant_method") == self.quantization:
            return hf_params
        return {}

    def as_quantized_checkpoint(self) -> ModelConfig:
        """This config for loading what a quantized engine saves: the quantized weights."""
        return dataclasses.replace(
            self,
            quantized_checkpoint=True,
            quantization_params=self.quant_config.to_dict() if self.quant_config else None,
        )

    def _derived_max_model_len(self) -> int:
        cfg = self.hf_config
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ValueError(
                f"The config of {self.model!r} names no architecture ('architectures' is empty)."
            )
        return archs[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        cfg = self.hf_config
        if getattr(cfg, "multi_query", False):  # GPTBigCode
            return 1
        n = getattr(cfg, "num_key_value_heads", None)
        return n if n else cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        return head_dim if head_dim else self.hidden_size // self.num_attention_heads

    def get_num_kv_heads(self, tp_size: int) -> int:
        """KV heads held by one rank: split when possible, replicated when fewer than ranks."""
        return max(1, self.num_key_value_heads // tp_size)

    @property
    def intermediate_size(self) -> tuple[str, int]:
        """(config name, value) of the MLP width, which the names differ on per family."""
        cfg = self.hf_config
        for key in ("intermediate_size", "ffn_dim", "n_inner"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return key, value
        return "4 * hidden_size", 4 * self.hidden_size  # GPT-2 style n_inner=None

    def verify_with_parallel_config(self, parallel_config: ParallelConfig) -> None:
        """Fail before any weight is read when the layers cannot be split ``tp`` ways.

        Attention heads and the MLP width are split; KV heads are split when ``tp``
        divides them and replicated when they divide ``tp``. Vocabularies are padded,
        so any size works.
        """
        tp = parallel_config.tensor_parallel_size
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        inter_name, inter = self.intermediate_size
        checks = [
            (
                lambda t: heads % t == 0,
                f"{heads} attention heads are not divisible by tensor_parallel_size={tp}",
            ),
            (
                lambda t: kv % t == 0 or t % kv == 0,
                f"{kv} KV heads can neither be split over nor replicated to "
                f"tensor_parallel_size={tp} (one must divide the other)",
            ),
            (
                lambda t: inter % t == 0,
                f"the intermediate size {inter} ({inter_name}) is not divisible by "
                f"tensor_parallel_size={tp}",
            ),
        ]
        for ok, problem in checks:
            if not ok(tp):
                valid = [t for t in range(1, heads + 1) if all(c(t) for c, _ in checks)]
                raise ValueError(
                    f"{problem}; try {_join_or(valid)}"
                    f" (model {self.model!r}: {heads} attention heads, {kv} KV heads, "
                    f"intermediate size {inter})."
                )


def _join_or(values: list[int]) -> str:
    """[1, 3, 9] -> '1, 3 or 9'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _load_hf_config(model: str, trust_remote_code: bool, revision: str | None) -> Any:
    from transformers import AutoConfig

    if is_gguf(model):
        return load_gguf_config(model, trust_remote_code)
    if not os.path.isdir(model):
        raise ValueError(
            f"model={model!r} is not a local directory. This engine never downloads: pass the "
            "path of a Hugging Face model directory (config.json and weights) or of a .gguf "
            "file."
        )
    try:
        return AutoConfig.from_pretrained(
            model, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as e:  # transformers raises several types for a bad config
        raise ValueError(f"Could not read a Hugging Face config from {model!r}: {e}") from e


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    # CPU KV cache budget in bytes (VLLM_CPU_KVCACHE_SPACE is in GiB, as upstream).
    cpu_kvcache_space_bytes: int | None = None
    # Filled in once workers have measured memory.
    num_gpu_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.kv_cache_dtype != "auto":
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use 'auto'."
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}."
            )
        if self.cpu_kvcache_space_bytes is None:
            value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4") or "4"
            try:
                gib = float(value) or 4.0  # 0 means the default, as upstream
            except ValueError:
                gib = float("nan")
            if not 0 < gib < float("inf"):  # also NaN
                raise ValueError(
                    f"VLLM_CPU_KVCACHE_SPACE={value!r} is not a size: give the CPU KV cache "
                    "budget in GiB as a positive number, e.g. VLLM_CPU_KVCACHE_SPACE=4."
                )
            self.cpu_kvcache_space_bytes = int(gib * (1 << 30))


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}.")
        if self.pipeline_parallel_size != 1:
            raise ValueError(
                f"pipeline_parallel_size={self.pipeline_parallel_size} is not supported; use 1."
            )
        backends = (None, "mp", "uni", "ray")
        if self.distributed_executor_backend not in backends:
            raise ValueError(
                f"distributed_executor_backend={self.distributed_executor_backend!r} is not "
                "one of 'mp', 'uni', 'ray' (or None to choose)."
            )
        if self.distributed_executor_backend is None:
            self.distributed_executor_backend = "uni" if self.world_size == 1 else "mp"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (
                8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
            )
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}."
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}, so long prompts could never be scheduled; "
                "raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill."
            )


@dataclass
class LoadConfig:
    load_format: str = "auto"
    download_dir: str | None = None
    model_loader_extra_config: dict | str | None = None
    ignore_patterns: list[str] | None = None

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format={self.load_format!r} is not supported; use one of "
                f"{', '.join(map(repr, LOAD_FORMATS))}."
            )
        extra = self.model_loader_extra_config
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"model_loader_extra_config is not valid JSON: {extra!r} ({e})"
                ) from e
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise ValueError(
                f"model_loader_extra_config must be a dict (or a JSON object string), got "
                f"{type(extra).__name__}."
            )
        self.model_loader_extra_config = extra


@dataclass
class DeviceConfig:
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not supported; use 'cpu' or 'cuda'.")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    scheduler_config: SchedulerConfig
    load_config: LoadConfig
    device_config: DeviceConfig
