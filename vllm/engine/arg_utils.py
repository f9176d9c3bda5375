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
    LOAD_FORMATS,
    CacheConfig,
    DeviceConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.engine.unsupported_args import (
    COMPAT_FLAGS,
    check_unsupported_args,
    compat_help,
)
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
    enable_prefix_caching: bool = False
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
        defaults = {f.name: f.default for f in fields(EngineArgs)}
        for title, args in _CLI_ARGS.items():
            # An argument group (upstream's generate.py passes one) takes the flags itself:
            # argparse deprecates groups inside groups.
            group = parser
            if not isinstance(parser, argparse._ArgumentGroup):
                group = parser.add_argument_group(title, _GROUP_DESCRIPTIONS.get(title))
            for spec in args:
                kwargs = dict(spec.kwargs)
                default = defaults[spec.name]
                help_text = spec.help.replace("%", "%%")
                if isinstance(default, bool):
                    kwargs["action"] = argparse.BooleanOptionalAction  # --x and --no-x
                elif default not in (None, ""):
                    help_text += " (default: %(default)s)"
                flags = ["--" + spec.name.replace("_", "-"), *spec.aliases]
                group.add_argument(
                    *flags, dest=spec.name, default=default, help=help_text, **kwargs
                )
        return parser

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

        model_config = ModelConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            tokenizer_mode=self.tokenizer_mode,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            seed=0 if self.seed is None else self.seed,  # upstream's LLM passes None
            revision=self.revision,
            max_model_len=self.max_model_len,
            quantization=self.quantization,
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


def _json_arg(value: str) -> Any:
    """argparse ``type`` for JSON values; the error names the offending text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {e}") from e


@dataclass(frozen=True)
class _Arg:
    """One CLI flag: the field it fills, its help, extra argparse kwargs, short aliases."""

    name: str
    help: str
    kwargs: dict[str, Any]
    aliases: tuple[str, ...] = ()


def _arg(name: str, help: str, *aliases: str, **kwargs: Any) -> _Arg:
    return _Arg(name, help, kwargs, aliases)


_COMPAT_GROUP = "Accepted for compatibility"
_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

# Booleans need no kwargs here: add_cli_args picks the action from the field's default.
_CLI_ARGS: dict[str, list[_Arg]] = {
    "Model": [
        _arg(
            "model",
            "Path of a local Hugging Face model directory (config.json and weights). "
            "Models are never downloaded.",
        ),
        _arg(
            "served_model_name",
            "Name(s) the OpenAI-compatible server accepts in the request's 'model' field; the "
            "first one is reported in responses. Defaults to --model.",
            nargs="+",
        ),
        _arg("tokenizer", "Tokenizer directory, when it differs from --model."),
        _arg(
            "tokenizer_mode",
            "'auto'/'hf' use the fast (Rust) tokenizer when one exists; 'slow' always uses the "
            "Python tokenizer. 'mistral' and 'custom' are not supported.",
            choices=["auto", "hf", "slow", "mistral", "custom"],
        ),
        _arg(
            "trust_remote_code",
            "Allow custom model/config code shipped in the model directory to run.",
        ),
        _arg("revision", "Model revision (branch, tag or commit) to read the config from."),
        _arg(
            "dtype",
            "Weight and activation dtype. 'auto' follows the model config (float32 if it names "
            "none); 'half'/'float16' is FP16, 'float'/'float32' is FP32.",
            choices=_DTYPES,
        ),
        _arg(
            "max_model_len",
            "Longest sequence (prompt + output) in tokens. Defaults to the model's maximum "
            "context length from its config; may only be lowered.",
            type=int,
        ),
        _arg(
            "quantization",
            "Quantization method of the weights. Not supported: leave unset.",
            "-q",
        ),
        _arg("seed", "Random seed for sampling.", type=int),
        _arg(
            "generation_config",
            "Where default sampling parameters come from: 'auto' reads the model's "
            "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
            "max_new_tokens); 'vllm' ignores it; or a directory holding a "
            "generation_config.json.",
        ),
        _arg(
            "override_generation_config",
            "JSON object laid over the generation config's sampling defaults, e.g. "
            "'{\"temperature\": 0.5}'.",
            type=_json_arg,
        ),
        _arg("max_logprobs", "Largest 'logprobs' a request may ask for.", type=int),
        _arg(
            "enforce_eager",
            "Always run the model eagerly: no CUDA graph capture (slower decode, less memory).",
        ),
    ],
    "Loading": [
        _arg(
            "load_format",
            "How to read the weights. 'auto': *.safetensors if present, else PyTorch *.bin/*.pt; "
            "'safetensors': only *.safetensors; 'pt': only PyTorch *.bin/*.pt; 'dummy': random "
            "weights with the right shapes, for profiling and tests; 'sharded_state': per-rank "
            "shards written by save_sharded_state, each rank reads only its own files (fastest "
            "start-up for tensor parallelism); 'gguf': a llama.cpp .gguf file, dequantized to "
            "--dtype as it loads (implied by a .gguf --model).",
            choices=LOAD_FORMATS,
        ),
        _arg(
            "model_loader_extra_config",
            "JSON object of extra options for the loader picked by --load-format, e.g. "
            '\'{"pattern": "model-rank-{rank}-part-{part}.safetensors", "verify": true}\' for '
            "sharded_state (verify: check every file's checksum).",
            type=_json_arg,
        ),
        _arg(
            "download_dir",
            "Weights cache directory (upstream downloads there; here models are local paths).",
        ),
        _arg(
            "ignore_patterns",
            "Glob of weight files to skip when loading; repeat the flag for several, e.g. "
            "'original/**/*' to skip Llama's duplicate consolidated checkpoint.",
            action="append",
        ),
    ],
    "KV cache": [
        _arg("block_size", "Tokens per KV cache block (a power of two).", type=int),
        _arg(
            "gpu_memory_utilization",
            "Fraction of GPU memory (0-1] the engine may use for weights, activations and the "
            "KV cache; the rest is left to other processes.",
            type=float,
        ),
        _arg(
            "kv_cache_dtype",
            "KV cache dtype. Only 'auto' (the model dtype) is supported.",
            choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        ),
        _arg(
            "num_gpu_blocks_override",
            "Use exactly this many KV cache blocks instead of sizing from memory (for tests and "
            "preemption experiments).",
            type=int,
        ),
    ],
    "Parallelism": [
        _arg(
            "tensor_parallel_size",
            "Number of GPUs (ranks) each layer is split across.",
            "-tp",
            type=int,
        ),
        _arg(
            "pipeline_parallel_size",
            "Number of pipeline stages. Only 1 is supported.",
            "-pp",
            type=int,
        ),
        _arg(
            "distributed_executor_backend",
            "How workers run: 'uni' in this process (one rank), 'mp' one process per rank, "
            "'ray' as upstream. Defaults to 'uni' for one rank, 'mp' for more.",
            choices=["mp", "uni", "ray"],
        ),
    ],
    "Scheduling": [
        _arg("max_num_seqs", "Most sequences in one batch (one engine step).", type=int),
        _arg(
            "max_num_batched_tokens",
            "Most tokens processed in one engine step. Defaults to 8192 (or max_model_len, if "
            "larger, with chunked prefill off).",
            type=int,
        ),
        _arg(
            "enable_chunked_prefill",
            "Split long prompts into chunks that share steps with decoding sequences.",
        ),
        _arg("disable_log_stats", "Do not log throughput and cache-usage statistics."),
    ],
    "Device": [
        _arg(
            "device",
            "Device to run on; 'auto' picks CUDA when available, else CPU.",
            choices=["auto", "cpu", "cuda"],
        ),
    ],
    _COMPAT_GROUP: [
        _arg(
            name,
            compat_help(name, help),
            *aliases,
            **{k: _json_arg if v == "json" else v for k, v in kwargs.items()},
        )
        for name, help, aliases, kwargs in COMPAT_FLAGS
    ],
}

_GROUP_DESCRIPTIONS = {
    _COMPAT_GROUP: (
        "vLLM flags this engine does not implement. Those that cannot change results are "
        "ignored with a warning; the others are refused with an error."
    ),
}
