"""Upstream engine arguments this engine does not implement, and what it does with each.

The rule: an argument that cannot change what a request returns (a cache size, a CUDA
graph knob, a limit on multi-modal inputs of a text-only engine) is accepted and ignored
with a warning, so upstream scripts run unchanged; one that would change the results if it
were ignored (speculative decoding, config overrides, custom logits processors) is refused
with an error that names it and says what to do instead.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# name -> why ignoring it cannot change results.
IGNORED_ARGS: dict[str, str] = {
    "code_revision": "models are local directories; no remote code is fetched",
    "tokenizer_revision": "tokenizers are read from local directories",
    "hf_token": "nothing is downloaded",
    "swap_space": "preempted sequences are recomputed instead of swapped",
    "cpu_offload_gb": "weights stay where the model runs",
    "kv_cache_memory_bytes": "the KV cache is sized from memory; its size never changes tokens",
    "max_seq_len_to_capture": "the model always runs eagerly (no CUDA graphs)",
    "disable_custom_all_reduce": "all-reduce always goes through torch.distributed",
    "compilation_config": "the model always runs eagerly (no torch.compile)",
    "disable_async_output_proc": "outputs are processed synchronously",
    "async_scheduling": "steps are scheduled synchronously",
    "additional_config": "no platform plugin reads it",
    "data_parallel_size": "one engine serves every request (data parallelism only adds throughput)",
    "enable_expert_parallel": "no mixture-of-experts model runs here",
    "enable_sleep_mode": "the engine has no sleep mode",
    "enable_lora": (
        "LoRA adapters are not supported: the base model runs, and any request with a "
        "lora_request is refused"
    ),
    "max_loras": "LoRA adapters are not supported",
    "max_lora_rank": "LoRA adapters are not supported",
    "allowed_local_media_path": "the engine runs text-only models",
    "limit_mm_per_prompt": "the engine runs text-only models",
    "mm_processor_kwargs": "the engine runs text-only models",
    "pooler_config": "only generation runs here",
    "override_pooler_config": "only generation runs here",
    "structured_outputs_config": "structured outputs are not supported per request either",
    "calculate_kv_scales": "the KV cache is never fp8",
}

# name -> what to do instead (setting one raises).
REFUSED_ARGS: dict[str, str] = {
    "skip_tokenizer_init": (
        "the engine always loads the tokenizer (outputs carry text); leave it False"
    ),
    "speculative_config": "speculative decoding is not supported; leave it unset",
    "hf_overrides": (
        "config overrides are not supported; edit config.json in a copy of the model directory"
    ),
    "worker_cls": "custom worker classes are not supported; leave it 'auto'",
    "logits_processors": "custom logits processors are not supported; leave it unset",
    "task": "only text generation runs here; use 'auto' or 'generate'",
    "runner": "only the generate runner exists here; use 'auto' or 'generate'",
    "convert": "models cannot be converted to pooling models here; use 'auto' or 'none'",
    "tokenizer_mode": ("only Hugging Face tokenizers are supported; use 'auto', 'hf' or 'slow'"),
}

# Refused arguments whose upstream values include ones that mean what this engine does.
_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "task": ("auto", "generate"),
    "runner": ("auto", "generate"),
    "convert": ("auto", "none"),
    "tokenizer_mode": ("auto", "hf", "slow"),
    "worker_cls": ("auto",),
}


def _is_set(value: Any, default: Any) -> bool:
    """Whether a value asks for something: an empty dict or list means unset, as upstream's
    ``LLM`` passes ``hf_overrides={}`` when none are given."""
    if value is None or (isinstance(value, (dict, list, tuple)) and not value):
        return False
    return value != default


def check_unsupported_args(engine_args: Any) -> None:
    """Warn about each ignored argument that is set; raise naming every refused one."""
    refused = []
    for f in fields(engine_args):
        name, value = f.name, getattr(engine_args, f.name)
        accepted = _ACCEPTED_VALUES.get(name)
        if accepted is not None:
            if value not in accepted:
                refused.append(f"{name}={value!r}: {REFUSED_ARGS[name]}")
        elif name in REFUSED_ARGS and _is_set(value, f.default):
            refused.append(f"{name}={value!r}: {REFUSED_ARGS[name]}")
        elif name in IGNORED_ARGS and _is_set(value, f.default):
            logger.warning(
                "%s=%r has no effect in this engine (%s); it is accepted for compatibility "
                "with vLLM and ignored.",
                name,
                value,
                IGNORED_ARGS[name],
            )
    if refused:
        raise ValueError(
            "Not supported by this engine, and ignoring it would change results: "
            + "; ".join(refused)
            + "."
        )


def compat_help(name: str, help: str) -> str:
    """A compatibility flag's help, ending with what this engine does with it."""
    accepted = _ACCEPTED_VALUES.get(name)
    if accepted is not None:
        return f"{help} Supported here: {' or '.join(map(repr, accepted))}."
    return f"{help} {'Refused if set.' if name in REFUSED_ARGS else 'Ignored.'}"


# CLI flags of the arguments above that are not engine flags already: (name, help,
# aliases, argparse kwargs); "json" as a type means a JSON value.
COMPAT_FLAGS: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = [
    ("task", "Upstream's model task.", (), {}),
    ("runner", "Upstream's runner type.", (), {}),
    ("convert", "Upstream's model conversion.", (), {}),
    ("enable_lora", "LoRA adapters.", (), {}),
    ("max_loras", "Most LoRA adapters in one batch.", (), {"type": int}),
    ("max_lora_rank", "Largest LoRA rank.", (), {"type": int}),
    ("skip_tokenizer_init", "Skip loading the tokenizer.", (), {}),
    ("code_revision", "Revision of remote model code on the Hub.", (), {}),
    ("tokenizer_revision", "Revision of the tokenizer on the Hub.", (), {}),
    ("hf_token", "Hugging Face Hub token.", (), {}),
    ("swap_space", "CPU swap space per GPU, in GiB.", (), {"type": float}),
    ("cpu_offload_gb", "GiB of weights to offload to CPU memory.", (), {"type": float}),
    ("kv_cache_memory_bytes", "KV cache size in bytes.", (), {"type": int}),
    ("max_seq_len_to_capture", "Longest sequence covered by CUDA graphs.", (), {"type": int}),
    ("disable_custom_all_reduce", "Use NCCL instead of the custom all-reduce kernel.", (), {}),
    ("speculative_config", "Speculative decoding settings (JSON).", (), {"type": "json"}),
    ("compilation_config", "torch.compile level or settings (JSON).", ("-O",), {"type": "json"}),
    ("hf_overrides", "Overrides for the Hugging Face config (JSON).", (), {"type": "json"}),
    ("disable_async_output_proc", "Disable async output processing.", (), {}),
    ("async_scheduling", "Schedule the next step while the current one runs.", (), {}),
    ("worker_cls", "Worker class to use.", (), {}),
    ("additional_config", "Platform-specific settings (JSON).", (), {"type": "json"}),
    ("data_parallel_size", "Number of data-parallel engines.", ("-dp",), {"type": int}),
    ("enable_expert_parallel", "Expert parallelism for MoE layers.", (), {}),
    ("enable_sleep_mode", "Allow the engine to sleep and wake.", (), {}),
    ("logits_processors", "Custom logits processor classes.", (), {"nargs": "+"}),
    ("limit_mm_per_prompt", "Most multi-modal items per prompt (JSON).", (), {"type": "json"}),
    ("mm_processor_kwargs", "Multi-modal processor options (JSON).", (), {"type": "json"}),
    ("allowed_local_media_path", "Directory multi-modal inputs may be read from.", (), {}),
    ("calculate_kv_scales", "Compute fp8 KV cache scales.", (), {}),
    ("pooler_config", "Pooling settings (JSON).", (), {"type": "json"}),
    ("override_pooler_config", "Pooling overrides (JSON).", (), {"type": "json"}),
    ("structured_outputs_config", "Structured output settings (JSON).", (), {"type": "json"}),
]
