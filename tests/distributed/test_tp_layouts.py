"""Layouts that cannot be split fail before any weight is read, naming what would work."""

from __future__ import annotations

import os

import psutil
import pytest

from vllm import LLM
from vllm.config import ModelConfig, ParallelConfig
from vllm.testing import make_config, make_model

NINE_HEADS = dict(
    hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=288
)

IMPOSSIBLE = [
    (
        "llama",
        NINE_HEADS,
        2,
        "9 attention heads are not divisible by tensor_parallel_size=2; try 1, 3 or 9",
    ),
    ("gpt2", {}, 3, "4 attention heads are not divisible by tensor_parallel_size=3; try 1, 2 or 4"),
    (
        "llama",
        dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=3, intermediate_size=96),
        2,
        "3 KV heads can neither be split over nor replicated to tensor_parallel_size=2 "
        "(one must divide the other); try 1, 3, 6 or 12",
    ),
    (
        "llama",
        dict(intermediate_size=130),
        4,
        "the intermediate size 130 (intermediate_size) is not divisible by "
        "tensor_parallel_size=4; try 1 or 2",
    ),
    ("opt", dict(ffn_dim=102), 4, "the intermediate size 102 (ffn_dim) is not divisible"),
]

POSSIBLE = [
    ("llama", {}, 4),  # 2 KV heads replicated over 4 ranks
    ("gpt_bigcode", {}, 4),  # one KV head (multi-query)
    ("gpt2", {}, 4),  # MLP width 4 * n_embd
    ("llama", NINE_HEADS, 9),
]


def _verify(arch: str, overrides: dict, tp: int) -> None:
    model_config = ModelConfig(model="unused", hf_config=make_config(arch, **overrides))
    model_config.verify_with_parallel_config(ParallelConfig(tensor_parallel_size=tp))


@pytest.mark.parametrize(("arch", "overrides", "tp", "message"), IMPOSSIBLE)
def test_impossible_layout_names_the_numbers(arch, overrides, tp, message):
    with pytest.raises(ValueError) as info:
        _verify(arch, overrides, tp)
    assert message in str(info.value)


@pytest.mark.parametrize(("arch", "overrides", "tp"), POSSIBLE)
def test_possible_layouts_pass(arch, overrides, tp):
    _verify(arch, overrides, tp)


def test_llm_fails_before_reading_weights_or_starting_workers(tmp_path):
    path = make_model("llama", str(tmp_path / "m"), vocab_size=1000, **NINE_HEADS)
    os.remove(os.path.join(path, "model.safetensors"))  # the check must not need them
    children_before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(ValueError) as info:
        LLM(model=path, tensor_parallel_size=2)
    assert "9 attention heads are not divisible by tensor_parallel_size=2; try 1, 3 or 9" in str(
        info.value
    )
    assert {p.pid for p in psutil.Process().children()} <= children_before  # none started
