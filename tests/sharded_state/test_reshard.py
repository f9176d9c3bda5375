"""Resharding: a checkpoint saved at tensor_parallel_size=M loads at N (smaller, larger,
coprime) with no original checkpoint present, each rank reading only its own slices, and
generates what the model loaded the default way at N generates."""

from __future__ import annotations

import json
import os

import pytest

from tests.sharded_state import worker_fns
from tests.sharded_state.common import ARCHS, greedy, make_llm, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files
from vllm.testing import make_model

# 12 heads and 12 KV heads: TP 1, 2, 3, 4 all split it.
TWELVE_HEADS = dict(
    hidden_size=96, num_attention_heads=12, num_key_value_heads=12, intermediate_size=192
)
CASES = [
    ("llama", 2, 1),
    ("llama", 2, 4),  # 2 KV heads replicated over 4 ranks
    ("llama12", 2, 3),
    ("llama12", 3, 1),
    ("llama12", 1, 3),
    ("gpt2", 1, 2),  # odd vocabulary: padding rows move between ranks
    ("gpt_neox", 2, 1),
    ("opt", 1, 2),
    ("gpt_bigcode", 4, 2),  # multi-query: one KV head replicated at both sizes
]


@pytest.fixture(scope="module")
def twelve_heads(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("llama12")), 1000, **TWELVE_HEADS)


@pytest.mark.parametrize(
    ("arch", "src_tp", "tp"), CASES, ids=[f"{a}-{m}to{n}" for a, m, n in CASES]
)
def test_load_at_another_tp(model_dirs, twelve_heads, tmp_path, arch, src_tp, tp):
    src = twelve_heads if arch == "llama12" else model_dirs(arch)
    prompts = random_prompts(3, ARCHS.get(arch, 1000), max_len=12, seed=src_tp * 10 + tp)
    out = str(tmp_path / "sharded")
    llm = make_llm(src, src_tp)
    llm.save_sharded_state(out)
    shutdown(llm)
    # Only the shards, their manifest and the config/tokenizer: no original weights.
    copy_metadata_files(src, out)
    assert not [n for n in os.listdir(out) if n.startswith("model.safetensors")]

    llm = make_llm(src, tp)
    want = greedy(llm, prompts)
    shutdown(llm)
    llm = make_llm(out, tp, load_format="sharded_state")
    assert greedy(llm, prompts) == want
    stats = llm.collective_rpc("get_load_stats")
    needed = llm.collective_rpc(worker_fns.state_nbytes)
    shutdown(llm)
    file_sizes = {n: os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)}
    largest_file = max(s for n, s in file_sizes.items() if n.endswith(".safetensors"))
    for rank_stats, nbytes in zip(stats, needed):
        # Its own slices plus the files' headers; a column range of a small tensor (under
        # 1 MiB) is cut from the whole tensor read once, hence the margin.
        assert rank_stats.bytes_read <= 1.3 * nbytes + 64 * 1024, (rank_stats, nbytes)
        if tp > src_tp:  # a saved file holds more than a new rank needs: read in part
            assert rank_stats.bytes_read < largest_file


def test_missing_saved_rank_is_named(model_dirs, tmp_path):
    src = model_dirs("llama")
    out = str(tmp_path / "sharded")
    llm = make_llm(src, 2)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    os.remove(os.path.join(out, "model-rank-1-part-0.safetensors"))
    with pytest.raises(Exception, match="model-rank-1-part-0.safetensors"):
        make_llm(out, 1, load_format="sharded_state")


def test_upstream_directory_without_manifest_reshards(model_dirs, tmp_path):
    """No manifest (saved by upstream vLLM): the layout is proven from the config and the
    files' shapes, and the checkpoint loads at another TP size."""
    src = model_dirs("llama")
    out = str(tmp_path / "sharded")
    llm = make_llm(src, 2)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    os.remove(os.path.join(out, "sharded_state.json"))
    prompts = random_prompts(2, ARCHS["llama"], max_len=10, seed=5)
    llm = make_llm(src, 1)
    want = greedy(llm, prompts)
    shutdown(llm)
    llm = make_llm(out, 1, load_format="sharded_state")
    assert greedy(llm, prompts) == want
    shutdown(llm)


def test_manifest_records_each_layout_and_refuses_another(model_dirs, tmp_path):
    """The manifest states each tensor's split in TP-independent form (the global shape
    without vocabulary padding); a layout other than the model's is refused by name."""
    src = model_dirs("llama")
    out = tmp_path / "sharded"
    llm = make_llm(src, 2)
    llm.save_sharded_state(str(out))
    shutdown(llm)
    copy_metadata_files(src, str(out))
    path = out / "sharded_state.json"
    manifest = json.loads(path.read_text())
    qkv = manifest["tensors"]["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv["global_shape"] == [128, 64] and qkv["shard_spec"] == {
        "dim": 0,
        "segments": [
            {"size": 64, "unit": 16},
            {"size": 32, "unit": 16, "replicate": True},
            {"size": 32, "unit": 16, "replicate": True},
        ],
    }
    head = manifest["tensors"]["lm_head.weight"]
    assert head["global_shape"] == [ARCHS["llama"], 64]
    assert head["shard_spec"] == {"dim": 0, "segments": [{"size": 1000, "pad_multiple": 64}]}
    assert manifest["tensors"]["model.norm.weight"]["shard_spec"] == {"dim": None, "segments": []}

    qkv["shard_spec"]["segments"] = [{"size": 128, "unit": 16}]  # as if q, k, v were one
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="qkv_proj.weight was saved split as .* cannot be"):
        make_llm(str(out), 1, load_format="sharded_state")
