"""EngineArgs and FlexibleArgumentParser: what a user sees on the command line and in errors."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket

import pytest
import torch

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.unsupported_args import IGNORED_ARGS, REFUSED_ARGS
from vllm.utils import FlexibleArgumentParser, cdiv, get_open_port


def _parser() -> FlexibleArgumentParser:
    return EngineArgs.add_cli_args(FlexibleArgumentParser())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def vllm_caplog(caplog: pytest.LogCaptureFixture):
    """caplog for the 'vllm' logger, which does not propagate to the root logger."""
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.propagate = True
    caplog.set_level(logging.WARNING, logger="vllm")
    try:
        yield caplog
    finally:
        vllm_logger.propagate = False


# ---- FlexibleArgumentParser and helpers --------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--tensor-parallel-size", "2"],
        ["--tensor_parallel_size", "2"],
        ["--tensor-parallel-size=2"],
        ["--tensor_parallel_size=2"],
        ["-tp", "2"],
    ],
)
def test_both_spellings_parse_alike(argv: list[str]) -> None:
    assert _parser().parse_args(argv).tensor_parallel_size == 2


def test_underscores_in_values_are_kept() -> None:
    args = _parser().parse_args(
        [
            "--served_model_name=my_model",
            "--download_dir",
            "/tmp/a_b",
            "--load_format=sharded_state",
        ]
    )
    assert args.served_model_name == ["my_model"]
    assert args.download_dir == "/tmp/a_b"
    assert args.load_format == "sharded_state"


def test_parse_known_args_also_normalizes() -> None:
    args, rest = _parser().parse_known_args(["--max_num_seqs=3", "--unknown_flag"])
    assert args.max_num_seqs == 3
    assert rest == ["--unknown-flag"]


def test_boolean_flags() -> None:
    parser = _parser()
    defaults = parser.parse_args([])
    assert defaults.enable_chunked_prefill is True
    assert defaults.trust_remote_code is False
    args = parser.parse_args(["--no-enable-chunked-prefill", "--trust_remote_code"])
    assert args.enable_chunked_prefill is False
    assert args.trust_remote_code is True


def test_json_flag_gives_dict() -> None:
    args = _parser().parse_args(["--model-loader-extra-config", '{"pattern": "x"}'])
    assert args.model_loader_extra_config == {"pattern": "x"}
    args = _parser().parse_args(['--model_loader_extra_config={"pattern": "x_y"}'])
    assert args.model_loader_extra_config == {"pattern": "x_y"}


def test_invalid_json_flag_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model-loader-extra-config", "{not json"])
    assert "{not json" in capsys.readouterr().err


def test_bad_dtype_flag_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


def test_get_open_port_and_cdiv() -> None:
    port = get_open_port()
    assert 0 < port < 65536
    with socket.socket() as s:  # the port really is free to bind
        s.bind(("127.0.0.1", port))
    assert [cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


# ---- CLI <-> EngineArgs ----------------------------------------------------------------


def test_every_field_has_a_flag_in_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(EngineArgs):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert len(help_text) > 3000
    for choice in ("'auto'", "'safetensors'", "'pt'", "'dummy'", "'sharded_state'"):
        assert choice in help_text


def test_parser_defaults_match_dataclass() -> None:
    assert EngineArgs.from_cli_args(_parser().parse_args([])) == EngineArgs()


def test_round_trip_equals_direct_construction() -> None:
    argv = [
        "--model", "/models/llama",
        "--served-model-name", "a", "b",
        "--dtype", "bfloat16",
        "--max_model_len", "1024",
        "--tensor-parallel-size", "2",
        "--distributed-executor-backend", "mp",
        "--gpu-memory-utilization", "0.5",
        "--load-format", "sharded_state",
        "--model-loader-extra-config", '{"pattern": "x"}',
        "--ignore-patterns", "original/**/*",
        "--no-enable-chunked-prefill",
        "--enforce-eager",
        "--seed", "7",
        "--swap-space", "2.5",
    ]  # fmt: skip
    from_cli = EngineArgs.from_cli_args(_parser().parse_args(argv))
    direct = EngineArgs(
        model="/models/llama",
        served_model_name=["a", "b"],
        dtype="bfloat16",
        max_model_len=1024,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        gpu_memory_utilization=0.5,
        load_format="sharded_state",
        model_loader_extra_config={"pattern": "x"},
        ignore_patterns=["original/**/*"],
        enable_chunked_prefill=False,
        enforce_eager=True,
        seed=7,
        swap_space=2.5,
    )
    assert from_cli == direct


# ---- create_engine_config ----------------------------------------------------------------


def test_create_engine_config_on_tiny_llama(tiny_llama: str) -> None:
    config = EngineArgs(model=tiny_llama).create_engine_config()
    assert isinstance(config, VllmConfig)
    assert config.model_config.dtype == torch.float32  # saved in float32
    assert config.model_config.max_model_len == 256
    assert config.scheduler_config.max_model_len == 256
    assert config.model_config.tokenizer == tiny_llama
    assert config.parallel_config.distributed_executor_backend == "uni"
    assert config.device_config.device in ("cpu", "cuda")

    config = EngineArgs(
        model=tiny_llama,
        dtype="bfloat16",
        max_model_len=64,
        model_loader_extra_config='{"pattern": "x"}',
        device="cpu",
    ).create_engine_config()
    assert config.model_config.dtype == torch.bfloat16
    assert config.model_config.max_model_len == 64
    assert config.scheduler_config.max_model_len == 64
    assert config.load_config.model_loader_extra_config == {"pattern": "x"}


def test_create_engine_config_from_cli(tiny_llama: str) -> None:
    args = _parser().parse_args(["--model", tiny_llama, "--dtype=half", "--max_num_seqs=4"])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.model_config.dtype == torch.float16
    assert config.scheduler_config.max_num_seqs == 4


def test_missing_model_raises() -> None:
    with pytest.raises(ValueError, match="No model given"):
        EngineArgs().create_engine_config()


def test_bad_dtype_raises(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="int8"):
        EngineArgs(model=tiny_llama, dtype="int8").create_engine_config()


def test_invalid_json_raises_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"not valid JSON.*\{bad json"):
        EngineArgs(model="m", model_loader_extra_config="{bad json")


def test_enable_lora_warns_and_lora_requests_are_refused(
    tiny_llama: str, vllm_caplog: pytest.LogCaptureFixture
) -> None:
    # Enabling LoRA changes no output by itself (upstream's sharded-state test relies on
    # that); a request that names an adapter is refused (test_llm_api.py).
    EngineArgs(model=tiny_llama, enable_lora=True).create_engine_config()
    assert any("enable_lora" in r.getMessage() for r in vllm_caplog.records)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(speculative_config={"num_speculative_tokens": 2}),
        dict(hf_overrides={"num_hidden_layers": 1}),
        dict(skip_tokenizer_init=True),
        dict(worker_cls="my.Worker"),
        dict(logits_processors=["my.Processor"]),
        dict(task="embed"),
        dict(runner="pooling"),
        dict(convert="embed"),
        dict(tokenizer_mode="mistral"),
    ],
)
def test_args_that_would_change_results_raise(tiny_llama: str, kwargs: dict) -> None:
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        EngineArgs(model=tiny_llama, **kwargs).create_engine_config()


def test_refused_args_are_named_together(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="speculative_config=.*hf_overrides="):
        EngineArgs(
            model=tiny_llama, speculative_config={"a": 1}, hf_overrides={"b": 2}
        ).create_engine_config()


def test_upstream_empty_values_count_as_unset(
    tiny_llama: str, vllm_caplog: pytest.LogCaptureFixture
) -> None:
    # Upstream's LLM passes hf_overrides={} and seed=None when the caller gives none.
    config = EngineArgs(
        model=tiny_llama, hf_overrides={}, seed=None, task="generate", runner="auto"
    ).create_engine_config()
    assert config.model_config.seed == 0
    assert not [r for r in vllm_caplog.records if "no effect" in r.getMessage()]


def test_unsupported_args_warn(tiny_llama: str, vllm_caplog: pytest.LogCaptureFixture) -> None:
    EngineArgs(model=tiny_llama, cpu_offload_gb=1, swap_space=8).create_engine_config()
    warnings = [r.getMessage() for r in vllm_caplog.records if r.levelno == logging.WARNING]
    assert any("cpu_offload_gb" in m and "no effect" in m for m in warnings), warnings
    assert any("swap_space" in m and "no effect" in m for m in warnings), warnings


@pytest.mark.parametrize(
    ("value", "expected"), [(None, True), (True, True), (False, False), ("default", True)]
)
def test_prefix_caching_is_on_unless_turned_off(
    tiny_llama: str, value: object, expected: bool, vllm_caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = {} if value == "default" else {"enable_prefix_caching": value}
    config = EngineArgs(model=tiny_llama, **kwargs).create_engine_config()
    assert config.cache_config.enable_prefix_caching is expected
    assert not [r for r in vllm_caplog.records if "prefix" in r.getMessage()]
    cli = ["--model", tiny_llama] + ([] if expected else ["--no-enable-prefix-caching"])
    args = EngineArgs.from_cli_args(_parser().parse_args(cli))
    assert args.create_engine_config().cache_config.enable_prefix_caching is expected


def test_defaults_do_not_warn(tiny_llama: str, vllm_caplog: pytest.LogCaptureFixture) -> None:
    EngineArgs(model=tiny_llama, served_model_name="tiny").create_engine_config()
    assert not [r for r in vllm_caplog.records if "no effect" in r.getMessage()]


def test_unsupported_tables_name_real_fields() -> None:
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(IGNORED_ARGS) <= names and set(REFUSED_ARGS) <= names
    assert not set(IGNORED_ARGS) & set(REFUSED_ARGS)
    assert "served_model_name" not in IGNORED_ARGS


def test_generation_config_must_be_auto_vllm_or_a_directory(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="generation_config='/no/such/dir' is not a directory"):
        EngineArgs(model=tiny_llama, generation_config="/no/such/dir").create_engine_config()
    config = EngineArgs(model=tiny_llama, generation_config=tiny_llama).create_engine_config()
    assert config.model_config.generation_config == tiny_llama


def test_add_cli_args_to_an_argument_group() -> None:
    # upstream's basic/generate.py: EngineArgs.add_cli_args(parser.add_argument_group(...))
    parser = FlexibleArgumentParser()
    group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(group)
    group.set_defaults(model="default-model")
    args = parser.parse_args(["--max-model-len", "64", "--no-enable-prefix-caching"])
    assert (args.model, args.max_model_len, args.enable_prefix_caching) == (
        "default-model",
        64,
        False,
    )


def test_upstream_compat_flags_parse() -> None:
    args = _parser().parse_args(
        ["--model", "m", "--generation-config", "vllm", "-O", "3", "--task", "generate",
         "--override-generation-config", '{"temperature": 0.5}', "--no-enforce-eager"]
    )  # fmt: skip
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.generation_config == "vllm"
    assert engine_args.compilation_config == 3
    assert engine_args.override_generation_config == {"temperature": 0.5}


AVX512 = "avx512f avx512bw avx512dq avx512vl"


@pytest.mark.parametrize(
    "flags,dtype,emulated,kernel_fits",
    [
        (f"fpu avx2 {AVX512}", "bfloat16", True, True),  # AVX-512 without BF16: emulated
        (f"fpu avx2 {AVX512} avx512_bf16", "bfloat16", False, False),
        ("fpu avx2 amx_bf16", "bfloat16", False, False),
        (f"fpu avx2 {AVX512}", "float16", True, True),
        ("fpu avx2", "float16", True, False),  # AVX2 only: the kernel is not measured there
        ("fpu avx2", "float32", False, False),
    ],
)
@pytest.mark.parametrize("kernels", ["built", "disabled"])
def test_cpu_without_native_16bit_gemm_is_reported(
    tiny_llama: str,
    vllm_caplog: pytest.LogCaptureFixture,
    monkeypatch,
    flags,
    dtype,
    emulated,
    kernel_fits,
    kernels,
) -> None:
    # Where the kernel runs the engine says its linear layers take it; without it (not
    # built, VLLM_CPU_LOWP_LINEAR=0, no AVX-512) it warns and suggests float32. CPUs with
    # native 16-bit GEMMs hear neither.
    import vllm.utils
    from vllm import _custom_ops as ops

    monkeypatch.setattr(vllm.utils, "_cpu_flags", lambda: frozenset(flags.split()))
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", kernels == "built")
    vllm_caplog.set_level(logging.INFO, logger="vllm")
    EngineArgs(model=tiny_llama, dtype=dtype, device="cpu").create_engine_config()
    messages = [r.getMessage() for r in vllm_caplog.records]
    hints = [m for m in messages if "dtype='float32'" in m]
    takes_kernel = [m for m in messages if "lowp_linear" in m]
    takes = emulated and kernel_fits and kernels == "built"
    assert len(hints) == (emulated and not takes), messages
    assert len(takes_kernel) == takes, messages
    for m in hints + takes_kernel:
        assert m.startswith(f"dtype={dtype} on a CPU without ")


@pytest.mark.parametrize(
    "flags,setting,wanted",
    [
        (f"fpu avx2 {AVX512}", None, True),
        (f"fpu avx2 {AVX512}", "0", False),
        ("fpu avx2", None, False),
        ("fpu avx2", "1", True),  # asks for the portable path on an AVX2 CPU
        (f"fpu avx2 {AVX512} avx512_bf16", "1", False),  # native: torch's GEMM stays
    ],
)
def test_lowp_linear_setting(monkeypatch, flags, setting, wanted) -> None:
    import vllm.utils
    from vllm import _custom_ops as ops

    monkeypatch.setattr(vllm.utils, "_cpu_flags", lambda: frozenset(flags.split()))
    if setting is None:
        monkeypatch.delenv("VLLM_CPU_LOWP_LINEAR", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_LOWP_LINEAR", setting)
    assert ops.lowp_linear_wanted(torch.bfloat16) is wanted
    assert ops.lowp_linear_wanted(torch.float32) is False
