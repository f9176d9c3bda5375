"""Save sharded, load with load_format="sharded_state": same weights, same greedy tokens.

Every architecture at TP=1 and TP=2; each case saves through a different entry point
(LLM.save_sharded_state, collective_rpc, the executor as upstream's example calls it)
and exercises one format feature (parts, a custom pattern, tied embeddings).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.sharded_state import worker_fns
from tests.sharded_state.common import ARCHS, greedy, make_llm, shard_files, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files

CASES = [(arch, tp) for arch in ARCHS for tp in (1, 2)]
PART_BYTES = 40_000  # small enough for several parts per rank
OPT_PATTERN = "opt-shard-{part}-of-rank-{rank}.safetensors"
TIED_KEPT, TIED_DROPPED = "lm_head.weight", "transformer.wte.weight"


def _save(llm, arch: str, out: str) -> None:
    """Each architecture saves through another entry point with other options."""
    if arch == "llama":
        llm.save_sharded_state(out, max_size=PART_BYTES)
    elif arch == "gpt2":
        llm.collective_rpc("save_sharded_state", kwargs={"path": out})
    elif arch == "gpt_neox":  # as upstream's examples/offline_inference/save_sharded_state.py
        llm.llm_engine.model_executor.save_sharded_state(path=out, pattern=None, max_size=None)
    elif arch == "opt":
        llm.llm_engine.model_executor.save_sharded_state(path=out, pattern=OPT_PATTERN)
    else:  # upstream's script passes --max-file-size through as a string
        llm.llm_engine.model_executor.save_sharded_state(path=out, max_size=str(PART_BYTES))


@pytest.mark.parametrize(("arch", "tp"), CASES, ids=[f"{a}-tp{t}" for a, t in CASES])
def test_round_trip(model_dirs, tmp_path, arch, tp):
    src = model_dirs(arch)
    prompts = random_prompts(4, ARCHS[arch], max_len=12, seed=tp)
    out = str(tmp_path / "sharded")
    llm = make_llm(src, tp)
    want_tokens = greedy(llm, prompts)
    want_state = llm.collective_rpc(worker_fns.state_digest)
    _save(llm, arch, out)
    shutdown(llm)
    copy_metadata_files(src, out)

    llm = make_llm(out, tp, load_format="sharded_state")
    assert llm.collective_rpc(worker_fns.state_digest) == want_state  # bitwise, every rank
    assert greedy(llm, prompts) == want_tokens
    if (arch, tp) == ("llama", 2):  # one rank failing fails the save on all, target untouched
        before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
        name = "model.layers.1.mlp.gate_up_proj.weight"
        llm.collective_rpc(worker_fns.reshape_param, args=(name, 1))
        with pytest.raises(RuntimeError, match=f"failed on rank 1: .*would not load.*{name}"):
            llm.save_sharded_state(out)
        assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
        assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    if (arch, tp) == ("gpt2", 2):  # saving over a TP=2 checkpoint: the ranks delete the old
        old_files = set(shard_files(out))
        llm.save_sharded_state(out, pattern="again-{rank}-{part}.safetensors")
        assert set(shard_files(out)) == {"again-0-0.safetensors", "again-1-0.safetensors"}
        assert not old_files & set(os.listdir(out))
        assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
        assert greedy(llm, prompts) == want_tokens  # still serving from the replaced files
    shutdown(llm)

    files = shard_files(out)
    manifest = json.load(open(os.path.join(out, "sharded_state.json")))
    assert manifest["tensor_parallel_size"] == tp
    assert set(manifest["files"]) == set(files)
    for name, info in manifest["files"].items():
        assert info["size"] == os.path.getsize(os.path.join(out, name))
        assert files[name], f"{name} is empty"  # never an empty part
    per_rank = {r: [n for n, i in manifest["files"].items() if i["rank"] == r] for r in range(tp)}
    assert all(per_rank.values())
    all_keys = [k for keys in files.values() for k in keys]
    assert len(all_keys) == len(set(all_keys)) * tp  # each rank stores each tensor once

    if arch == "llama":
        assert all(len(names) > 1 for names in per_rank.values()), per_rank
        qkv = manifest["tensors"]["model.layers.0.self_attn.qkv_proj.weight"]
        # 4 q heads + 2 k + 2 v heads of 16 over tp ranks, as upstream lays them out
        assert qkv["local_shape"] == [128 // tp, 64] and qkv["global_shape"] == [128, 64]
        assert qkv["shard_dim"] == 0
        down = manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]
        assert down["shard_dim"] == 1 and down["global_shape"] == [64, 128]
        assert manifest["tensors"]["model.norm.weight"]["shard_dim"] is None
        for scale in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
            entry = manifest["tensors"][f"model.layers.1.self_attn.attn.{scale}"]
            assert entry["dtype"] == "float32" and entry["local_shape"] == []
    if arch == "gpt2":  # tied: one copy, under the smaller key, as upstream
        assert TIED_KEPT in all_keys and TIED_DROPPED not in all_keys
    if arch == "opt":
        assert all(n.startswith("opt-shard-") for n in files) and manifest["pattern"] == OPT_PATTERN
        assert "lm_head.weight" in all_keys and "model.decoder.embed_tokens.weight" not in all_keys
    if arch == "gpt_bigcode":
        assert all(len(names) > 1 for names in per_rank.values())
    if tp == 2:  # a TP=2 checkpoint loads at TP=1 too, resharded (see test_reshard.py)
        llm = make_llm(out, 1, load_format="sharded_state")
        assert greedy(llm, prompts) == want_tokens
        shutdown(llm)
