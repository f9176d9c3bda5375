"""The command-line flags of the engine arguments (``EngineArgs.add_cli_args``): one per
field, with its help text and ``--help`` group."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from vllm.config import LOAD_FORMATS
from vllm.engine.unsupported_args import COMPAT_FLAGS, compat_help


def add_engine_flags(
    parser: argparse.ArgumentParser, defaults: dict[str, Any]
) -> argparse.ArgumentParser:
    """Add the flag of every engine argument to ``parser``, grouped as ``--help`` shows
    them, each with its field's default from ``defaults``; return ``parser``."""
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
            group.add_argument(*flags, dest=spec.name, default=default, help=help_text, **kwargs)
    return parser


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
            "Path of a local Hugging Face model directory (config.json and weights), a "
            "sharded-state checkpoint, or a llama.cpp .gguf file. Models are never downloaded.",
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
            "Quantize the linear layers' weights after loading: 'fp8' (E4M3, a scale per "
            "output channel), 'int8' (a scale per output channel) or 'deepspeedfp' (8-bit "
            "floats, a scale per group of columns); 'gguf' for a GGUF file. A sharded_state "
            "checkpoint saved quantized loads quantized without it.",
            "-q",
            choices=["fp8", "int8", "deepspeedfp", "gguf"],
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
            "enable_prefix_caching",
            "Keep the KV cache blocks of finished requests and reuse them for later prompts "
            "that start with the same tokens (on by default, as upstream).",
        ),
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
