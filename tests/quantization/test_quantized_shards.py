"""Quantize after loading, save the quantized shards, load them already quantized: the
flow of the save_sharded_state example's ``--quantization``, for every architecture."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tests.sharded_state.common import greedy, make_llm, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import save_metadata_files
from vllm.testing import make_model

VOCAB = 320
# Linear layers hold most of the weights here, as in real models (the tiny test configs
# are mostly embedding), so the shard sizes say what quantizing them saves.
SHAPES = {
    "llama": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4),
    "gpt2": dict(n_embd=128, n_layer=4, n_positions=256),
    "gpt_neox": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4),
    "opt": dict(
        hidden_size=128,
        ffn_dim=512,
        num_hidden_layers=4,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
    ),
    "gpt_bigcode": dict(n_embd=128, n_layer=4, n_positions=256),
}
PROMPTS = random_prompts(3, VOCAB, max_len=12, seed=3)
METHODS = ("fp8", "int8", "deepspeedfp")
CASES = [(arch, method, tp) for tp in (1, 2) for arch in SHAPES for method in METHODS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    def build(arch: str) -> str:
        path = str(tmp_path_factory.getbasetemp() / f"quant-{arch}")
        if not os.path.isdir(path):
            make_model(arch, path, vocab_size=VOCAB, dtype="bfloat16", **SHAPES[arch])
            if arch == "llama":  # deepspeedfp reads its groups from the model's config
                with open(os.path.join(path, "config.json")) as f:
                    config = json.load(f)
                config["quantization_config"] = {"quant_method": "deepspeedfp", "group_size": 64}
                with open(os.path.join(path, "config.json"), "w") as f:
                    json.dump(config, f)
        return path

    return build


def _save(llm, model: str, out: str) -> int:
    """Save ``llm``'s shards as the example does; return the shard files' bytes."""
    llm.save_sharded_state(out)
    save_metadata_files(llm, model, out)
    return sum(
        os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors")
    )


@pytest.fixture(scope="module")
def bf16_bytes(model_dir, tmp_path_factory):
    sizes = {}

    def get(arch: str, tp: int) -> int:
        """The bytes of a bfloat16 save at the same TP (replicated tensors count per rank)."""
        if (arch, tp) not in sizes:
            llm = make_llm(model_dir(arch), tp, dtype="bfloat16")
            out = str(tmp_path_factory.mktemp(f"bf16-{arch}-{tp}"))
            sizes[arch, tp] = _save(llm, model_dir(arch), out)
            shutdown(llm)
        return sizes[arch, tp]

    return get


@pytest.mark.parametrize(("arch", "method", "tp"), CASES)
def test_quantized_shards_load_as_saved(model_dir, bf16_bytes, tmp_path, arch, method, tp):
    model = model_dir(arch)
    llm = make_llm(model, tp, dtype="bfloat16", quantization=method)
    expected = greedy(llm, PROMPTS)
    out = str(tmp_path / "out")
    size = _save(llm, model, out)
    shutdown(llm)

    with open(os.path.join(out, "sharded_state.json")) as f:
        manifest = json.load(f)
    assert manifest["quantization"] == method
    if method == "deepspeedfp":
        group = 64 if arch == "llama" else 512
        assert manifest["quantization_config"] == {"weight_bits": 8, "group_size": group}
    weight = next(t for n, t in manifest["tensors"].items() if n.endswith("down_proj.weight")
                  or n.endswith("c_proj.weight") or n.endswith("dense_4h_to_h.weight")
                  or n.endswith("fc2.weight"))  # fmt: skip
    assert weight["dtype"] == ("int8" if method == "int8" else "float8_e4m3fn")
    assert size <= 0.6 * bf16_bytes(arch, tp), (size, bf16_bytes(arch, tp))

    # No quantization= needed: the manifest names the method; the weights stay 8-bit.
    loaded = make_llm(out, tp, dtype="bfloat16", load_format="sharded_state")
    assert loaded.llm_engine.vllm_config.model_config.quantization == method
    assert greedy(loaded, PROMPTS) == expected
    shutdown(loaded)
    if (arch, tp) == ("llama", 1):  # the same with the method named
        again = make_llm(
            out, tp, dtype="bfloat16", load_format="sharded_state", quantization=method
        )
        assert greedy(again, PROMPTS) == expected
        shutdown(again)


def test_weights_stay_quantized_in_memory(model_dir, tmp_path) -> None:
    llm = make_llm(model_dir("llama"), dtype="bfloat16", quantization="fp8")
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert mlp.gate_up_proj.weight_scale.shape == (1024, 1)
    linear_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "proj" in n
    )
    linear_params = sum(p.numel() for n, p in model.named_parameters() if "proj.weight" in n)
    assert linear_bytes < 0.55 * 2 * linear_params  # about half of bfloat16, scales included
    shutdown(llm)


def test_mismatched_quantization_is_refused(model_dir, tmp_path) -> None:
    model = model_dir("llama")
    llm = make_llm(model, dtype="bfloat16", quantization="int8")
    out = str(tmp_path / "out")
    _save(llm, model, out)
    shutdown(llm)
    message = (
        "saved with quantization='int8' (its sharded_state.json), but quantization='fp8' "
        "was passed; pass quantization='int8' or leave it unset"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        make_llm(out, dtype="bfloat16", load_format="sharded_state", quantization="fp8")


def test_unknown_method_names_the_supported_ones(model_dir) -> None:
    with pytest.raises(ValueError, match="quantization='awq' is not supported; use one of 'fp8'"):
        make_llm(model_dir("llama"), quantization="awq")


@pytest.mark.parametrize("method", ["fp8", "deepspeedfp"])
def test_quantized_shards_reshard_to_another_tp(model_dir, tmp_path, method) -> None:
    """Per-channel scales span whole rows and llama's deepspeedfp groups (64 columns)
    never cross a rank's columns at TP 1 or 2: saved at 2, the shards load at 1 as the
    weights a TP=1 engine quantizes itself."""
    model = model_dir("llama")
    llm = make_llm(model, 2, dtype="bfloat16", quantization=method)
    out = str(tmp_path / "out")
    _save(llm, model, out)
    shutdown(llm)
    llm = make_llm(model, dtype="bfloat16", quantization=method)
    expected = greedy(llm, PROMPTS)
    shutdown(llm)
    loaded = make_llm(out, dtype="bfloat16", load_format="sharded_state")
    assert greedy(loaded, PROMPTS) == expected
    shutdown(loaded)


def test_groups_that_would_cross_ranks_are_refused_when_resharding(model_dir, tmp_path) -> None:
    """gpt2's default 512-column groups: at TP=2 each rank's 256-column half of c_proj's
    rows is its own group, which TP=1's single group per row cannot be cut from."""
    model = model_dir("gpt2")
    llm = make_llm(model, 2, dtype="bfloat16", quantization="deepspeedfp")
    out = str(tmp_path / "out")
    _save(llm, model, out)
    shutdown(llm)
    with pytest.raises(ValueError, match="weight_scale was saved split as .* scale groups"):
        make_llm(out, dtype="bfloat16", load_format="sharded_state")


def test_vllm_reshard_writes_what_a_quantized_save_at_the_new_size_writes(
    model_dir, tmp_path
) -> None:
    from tests.sharded_state.test_reshard_cli import assert_same_files, reshard

    model = model_dir("llama")
    saves = {}
    for tp in (2, 1):
        llm = make_llm(model, tp, dtype="bfloat16", quantization="fp8")
        saves[tp] = str(tmp_path / f"tp{tp}")
        _save(llm, model, saves[tp])
        shutdown(llm)
    out = str(tmp_path / "resharded")
    reshard(saves[2], out, 1, "--verify")
    assert_same_files(out, saves[1])
