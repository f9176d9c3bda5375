"""Default loader: formats, strictness and the errors a user sees."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm import LLM, SamplingParams
from vllm.testing import make_model

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=1000)


@pytest.fixture(scope="module")
def reference_tokens(model_dir):
    llm = LLM(model=model_dir)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def _copy_without_weights(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return dst


def test_pt_format_matches_safetensors(model_dir, reference_tokens, tmp_path):
    """A .bin checkpoint (read with weights_only=True) gives the same tokens."""
    dst = _copy_without_weights(model_dir, str(tmp_path / "bin"))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    for fmt in ("pt", "auto"):
        llm = LLM(model=dst, load_format=fmt)
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == reference_tokens


def test_bin_with_code_is_refused(model_dir, tmp_path):
    """weights_only loading: a pickle that would run code is rejected, not executed."""
    dst = _copy_without_weights(model_dir, str(tmp_path / "evil"))
    torch.save({"x": os.system}, os.path.join(dst, "pytorch_model.bin"))
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        LLM(model=dst, load_format="pt")


def test_dummy_format_needs_no_weights(model_dir, tmp_path):
    dst = _copy_without_weights(model_dir, str(tmp_path / "dummy"))
    llm = LLM(model=dst, load_format="dummy")
    out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_missing_weights_are_named(model_dir, tmp_path):
    dst = _copy_without_weights(model_dir, str(tmp_path / "missing"))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(model=dst)


def test_unexpected_weights_are_named(model_dir, tmp_path):
    dst = _copy_without_weights(model_dir, str(tmp_path / "extra"))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    state["model.layers.0.mlp.surprise.weight"] = torch.zeros(2, 2)
    save_file(state, os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.surprise\.weight"):
        LLM(model=dst)


def test_shape_mismatch_is_reported(model_dir, tmp_path):
    dst = _copy_without_weights(model_dir, str(tmp_path / "shape"))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?i)shape mismatch.*\(7,\)"):
        LLM(model=dst)


def _rewrite(model_dir: str, dst: str, edit) -> str:
    """A copy of the model whose state dict went through ``edit``."""
    dst = _copy_without_weights(model_dir, dst)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "piece",
    [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    ],
)
def test_fused_weight_missing_a_piece_is_refused(model_dir, tmp_path, piece):
    """q/k/v and gate/up fill one fused parameter each: without one piece its rows would
    stay uninitialised, and the model would load and produce garbage."""
    name = f"model.layers.1.{piece}.weight"
    dst = _rewrite(model_dir, str(tmp_path / "partial"), lambda state: state.pop(name))
    with pytest.raises(ValueError, match=rf"lacks 1 tensor.*{name.replace('.', '[.]')}"):
        LLM(model=dst)


def test_fused_weight_missing_a_piece_is_refused_at_tp2(model_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    dst = _rewrite(model_dir, str(tmp_path / "partial"), lambda state: state.pop(name))
    with pytest.raises(ValueError, match=rf"lacks 1 tensor.*{name}"):
        LLM(model=dst, tensor_parallel_size=2, device="cpu")


@pytest.mark.parametrize(
    ("name", "dim", "change"),
    [
        ("model.layers.0.mlp.down_proj.weight", 1, -2),  # row-parallel, too narrow
        ("model.layers.0.mlp.down_proj.weight", 1, 128),  # too wide: each rank's slice fits
        ("model.layers.1.self_attn.k_proj.weight", 0, 32),  # a fused piece, too tall
        ("model.layers.1.mlp.up_proj.weight", 0, 2),
    ],
)
def test_shape_mismatch_at_tp2_names_the_tensor(model_dir, tmp_path, name, dim, change):
    """At TP=2 each rank loads a slice: a checkpoint tensor of the wrong size must be
    refused even where both slices would fit in it (a wrong model, silently)."""

    def resize(state):
        t = state[name]
        size = t.shape[dim] + change
        if change > 0:
            extra = torch.zeros_like(t.narrow(dim, 0, 1)).expand(
                *[change if d == dim else s for d, s in enumerate(t.shape)]
            )
            state[name] = torch.cat([t, extra], dim).contiguous()
        else:
            state[name] = t.narrow(dim, 0, size).contiguous()

    dst = _rewrite(model_dir, str(tmp_path / "shape"), resize)
    with pytest.raises(ValueError, match=rf"{name}.*(?i:shape mismatch)"):
        LLM(model=dst, tensor_parallel_size=2, device="cpu")


def test_fused_checkpoint_tensor_of_the_wrong_size_is_refused(tmp_path):
    """GPT-2's c_attn holds q, k and v in one tensor: extra rows are not cut off."""
    src = make_model("gpt2", str(tmp_path / "gpt2"), vocab_size=1000)

    def taller(state):  # Conv1D stores (in, out): 8 more output features
        w = state["transformer.h.0.attn.c_attn.weight"]
        state["transformer.h.0.attn.c_attn.weight"] = torch.cat([w, w[:, :8]], 1).contiguous()

    dst = _rewrite(src, str(tmp_path / "taller"), taller)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight.*(?i:shape mismatch)"):
        LLM(model=dst)


def test_integer_tensor_for_a_float_parameter_is_refused(model_dir, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"

    def to_int(state):
        state[name] = state[name].to(torch.int32)

    dst = _rewrite(model_dir, str(tmp_path / "int"), to_int)
    with pytest.raises(ValueError, match=rf"{name}.*torch\.int32.*torch\.float32"):
        LLM(model=dst)


def test_float_checkpoint_is_cast_to_the_model_dtype(model_dir, reference_tokens, tmp_path):
    """Float-to-float casts stay allowed: float64 tensors load into a float32 model."""

    def to_double(state):
        for key in state:
            state[key] = state[key].double()

    dst = _rewrite(model_dir, str(tmp_path / "f64"), to_double)
    out = LLM(model=dst, dtype="float32").generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == reference_tokens


def test_no_weights_found(model_dir, tmp_path):
    dst = _copy_without_weights(model_dir, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="No model weights found"):
        LLM(model=dst)


def test_not_a_directory():
    with pytest.raises(ValueError, match="not a local directory"):
        LLM(model="/definitely/not/here")
