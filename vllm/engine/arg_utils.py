"""EngineArgs: upstream vLLM's engine arguments, their CLI flags, and the configs they build."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from vllm import _custom_ops as ops
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.engine.arg_flags import add_engine_flags
from vllm.engine.unsupported_args import check_unsupported_args
from vllm.logger import init_logger
from vllm.transformers_utils.gguf_utils import is_gguf
from vllm.utils import NATIVE_GEMM_FLAGS, FlexibleArgumentParser, cpu_lacks_native_gemm

__all__ = ["EngineArgs", "FlexibleArgumentParser"]

logger = init_logger(__name__)


def _log_cpu_lowp_gemm(dtype: torch.dtype) -> None:
    """Say how the linear layers of a 16-bit ``dtype`` run on a CPU with no native GEMM
    for it (torch emulates those at about a third of its float32 speed)."""
    name = str(dtype).removeprefix("torch.")
    flags = " or ".join(NATIVE_GEMM_FLAGS[name])
    if ops.HAS_CPU_KERNELS and ops.lowp_linear_wanted(dtype):
        logger.info(
            "dtype=%s on a CPU without %s: linear layers widen the %s weights to float32 "
            "as they read them (vllm._C lowp_linear) instead of torch's emulated GEMM.",
            name,
            flags,
            name,
        )
        return
    if not ops.HAS_CPU_KERNELS:
        alternative = "; or reinstall with a C compiler to build vllm._C"
    elif os.environ.get("VLLM_CPU_LOWP_LINEAR") == "0":
        alternative = "; or unset VLLM_CPU_LOWP_LINEAR=0"
    else:  # no AVX-512: the kernel's portable path is there, but was not measured
        alternative = "; or try VLLM_CPU_LOWP_LINEAR=1 (vllm._C's portable kernel)"
    logger.warning(
        "dtype=%s on a CPU without %s: torch emulates %s matrix multiplies, several times "
        "slower than float32. dtype='float32' runs faster here, at twice the weight memory%s.",
        name,
        flags,
        name,
        alternative,
    )


@dataclass
class EngineArgs:
    """Arguments for the engine, with upstream vLLM's names and defaults."""

    model: str = ""
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    download_dir: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    block_size: int = 16
    enable_prefix_caching: bool | None = True  # None: the default, as upstream's
    swap_space: float = 4
    cpu_offload_gb: float = 0
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_logprobs: int = 20
    disable_log_stats: bool = False
    revision: str | None = None
    code_revision: str | None = None
    tokenizer_revision: str | None = None
    quantization: str | None = None
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192
    disable_custom_all_reduce: bool = False
    num_gpu_blocks_override: int | None = None
    model_loader_extra_config: dict | str | None = None
    ignore_patterns: str | list[str] | None = None
    enable_chunked_prefill: bool = True
    device: str = "auto"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    speculative_config: dict[str, Any] | None = None
    compilation_config: int | dict[str, Any] | None = None
    hf_overrides: dict[str, Any] | None = None
    disable_async_output_proc: bool = False
    worker_cls: str = "auto"
    additional_config: dict[str, Any] | None = None
    # Sampling defaults: 'auto' reads the model's generation_config.json, 'vllm' ignores it,
    # a directory reads that directory's; override_generation_config is laid over them.
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    # Upstream arguments handled by vllm/engine/unsupported_args.py (ignored or refused).
    task: str = "auto"
    runner: str = "auto"
    convert: str = "auto"
    hf_token: bool | str | None = None
    kv_cache_memory_bytes: int | None = None
    async_scheduling: bool = False
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_sleep_mode: bool = False
    logits_processors: list[Any] | None = None
    limit_mm_per_prompt: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    allowed_local_media_path: str = ""
    calculate_kv_scales: bool = False
    pooler_config: dict[str, Any] | None = None
    override_pooler_config: dict[str, Any] | None = None
    structured_outputs_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        extra = self.model_loader_extra_config
        if isinstance(extra, str):
            try:
                self.model_loader_extra_config = json.loads(extra) if extra.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"model_loader_extra_config is not valid JSON: {extra!r} ({e}). "
                    'Pass a JSON object, e.g. \'{"pattern": "model-rank-{rank}.safetensors"}\'.'
                ) from e
        if isinstance(self.ignore_patterns, str):
            self.ignore_patterns = [self.ignore_patterns]

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one ``--kebab-case`` flag per field to ``parser`` and return it."""
        return add_engine_flags(parser, {f.name: f.default for f in fields(EngineArgs)})

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """Pick this dataclass's fields out of a parsed namespace."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def create_engine_config(self) -> VllmConfig:
        """Validate the arguments and build the per-concern configs from vllm/config.py."""
        if not self.model:
            raise ValueError(
                "No model given: set EngineArgs.model (or --model) to the path of a local "
                "Hugging Face model directory."
            )
        check_unsupported_args(self)
        load_format = self._resolve_load_format()
        quantization, quantization_params, quantized_checkpoint = self._resolve_quantization(
            load_format
        )

        model_config = ModelConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            tokenizer_mode=self.tokenizer_mode,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            seed=0 if self.seed is None else self.seed,  # upstream's LLM passes None
            revision=self.revision,
            max_model_len=self.max_model_len,
            quantization=quantization,
            quantization_params=quantization_params,
            quantized_checkpoint=quantized_checkpoint,
            enforce_eager=self.enforce_eager,
            max_logprobs=self.max_logprobs,
            generation_config=self.generation_config,
            override_generation_config=self.override_generation_config or {},
        )
        cache_config = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            swap_space=self.swap_space,
            kv_cache_dtype=self.kv_cache_dtype,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching is not False,
        )
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
        )
        model_config.verify_with_parallel_config(parallel_config)
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=model_config.max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
        )
        load_config = LoadConfig(
            load_format=load_format,
            download_dir=self.download_dir,
            model_loader_extra_config=self.model_loader_extra_config,
            ignore_patterns=self.ignore_patterns,
        )
        device_config = DeviceConfig(device=self.device)
        if device_config.device == "cpu" and cpu_lacks_native_gemm(model_config.dtype):
            _log_cpu_lowp_gemm(model_config.dtype)
        return VllmConfig(
            model_config=model_config,
            cache_config=cache_config,
            parallel_config=parallel_config,
            scheduler_config=scheduler_config,
            load_config=load_config,
            device_config=device_config,
        )

    def _resolve_quantization(self, load_format: str) -> tuple[str | None, dict | None, bool]:
        """(method, its parameters, whether the checkpoint holds quantized weights).

        A sharded_state checkpoint holds what its engine ran: a manifest names the method
        (then ``quantization=`` may be left out), and shards saved by upstream without one
        are quantized when ``quantization=`` is given.
        """
        if load_format != "sharded_state":
            return self.quantization, None, False
        from vllm.model_executor.model_loader.sharded_state.manifest import read_manifest

        manifest = read_manifest(self.model) if os.path.isdir(self.model) else None
        if manifest is None:
            return self.quantization, None, self.quantization is not None
        saved = manifest.quantization
        if self.quantization is not None and self.quantization != saved:
            raise ValueError(
                f"{self.model} was saved with quantization={saved!r} (its sharded_state.json), "
                f"but quantization={self.quantization!r} was passed; pass "
                f"quantization={saved!r} or leave it unset."
            )
        return saved, manifest.quantization_config, saved is not None

    def _resolve_load_format(self) -> str:
        """'auto' reads a ``.gguf`` model file as 'gguf', as upstream infers it from the
        file; formats that read a directory refuse one, and 'gguf' refuses a directory."""
        gguf = is_gguf(self.model)
        if gguf and self.load_format == "auto":
            return "gguf"
        if self.load_format == "gguf" and not gguf:
            raise ValueError(
                f"load_format='gguf' reads one .gguf file, but model={self.model!r} is not "
                "one; pass the path of the .gguf file itself."
            )
        if gguf and self.load_format not in ("gguf", "dummy"):
            raise ValueError(
                f"model={self.model!r} is a GGUF file, which load_format="
                f"{self.load_format!r} cannot read; use load_format='gguf' (or 'auto')."
            )
        return self.load_format
