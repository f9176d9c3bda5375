"""``shard_spec``: what each parallel parameter states about its sharding is what its
``weight_loader`` does, for every architecture, TP size and rank."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vllm.config import ModelConfig, ParallelConfig
from vllm.distributed import get_tensor_model_parallel_rank, tensor_parallel_state
from vllm.model_executor.layers.shard_spec import Piece, Segment, ShardSpec, get_shard_spec
from vllm.model_executor.models.registry import ModelRegistry
from vllm.model_executor.utils import get_shard_dim
from vllm.testing import make_config, make_model

# --- local_pieces -----------------------------------------------------------------------


def test_even_split():
    spec = ShardSpec(0, (Segment(8),))
    assert spec.local_size(2) == 4
    assert spec.local_pieces(0, 2) == [Piece(0, 4, 0)]
    assert spec.local_pieces(1, 2) == [Piece(4, 4, 0)]
    assert spec.local_pieces(0, 1) == [Piece(0, 8, 0)]


def test_segments_concatenate_per_rank():
    spec = ShardSpec(0, (Segment(8), Segment(4)))  # gate then up
    assert spec.global_size == 12
    assert spec.local_pieces(1, 2) == [Piece(4, 4, 0), Piece(10, 2, 4)]


def test_heads_split_whole():
    spec = ShardSpec(1, (Segment(64, unit=16),))
    assert spec.local_pieces(3, 4) == [Piece(48, 16, 0)]
    with pytest.raises(ValueError) as info:
        spec.local_pieces(0, 8)
    assert "4 units of 16 rows are not divisible by tensor_parallel_size=8" in str(info.value)


def _qkv(heads: int, kv_heads: int, head_dim: int = 16) -> ShardSpec:
    kv = Segment(kv_heads * head_dim, head_dim, replicate=True)
    return ShardSpec(0, (Segment(heads * head_dim, head_dim), kv, kv))


def test_kv_heads_replicated_tp4_over_2():
    spec = _qkv(4, 2)  # global rows: q 0-63, k 64-95, v 96-127
    assert spec.local_size(4) == 48
    kv_head = [0, 0, 1, 1]  # rank r holds KV head r // (4 // 2)
    for r in range(4):
        k, v = 64 + 16 * kv_head[r], 96 + 16 * kv_head[r]
        assert spec.local_pieces(r, 4) == [Piece(16 * r, 16, 0), Piece(k, 16, 16), Piece(v, 16, 32)]


def test_kv_heads_replicated_tp4_over_1():
    spec = _qkv(4, 1)  # multi-query
    for r in range(4):
        assert spec.local_pieces(r, 4) == [
            Piece(16 * r, 16, 0),
            Piece(64, 16, 16),
            Piece(80, 16, 32),
        ]


def test_kv_heads_split_when_fewer_ranks():
    assert _qkv(4, 2).local_pieces(1, 2) == [
        Piece(32, 32, 0),
        Piece(80, 16, 32),
        Piece(112, 16, 48),
    ]


def test_vocab_padding_odd_vocab():
    spec = ShardSpec(0, (Segment(1001, pad_multiple=64),))
    assert spec.local_size(1) == 1024  # padded to a multiple of 64
    assert spec.local_pieces(0, 1) == [Piece(0, 1001, 0)]
    assert spec.local_size(3) == 384  # 1001 -> 1152 = 3 * 384
    assert [spec.local_pieces(r, 3) for r in range(3)] == [
        [Piece(0, 384, 0)],
        [Piece(384, 384, 0)],
        [Piece(768, 233, 0)],  # rows 233..383 of rank 2 are padding
    ]
    tiny = ShardSpec(0, (Segment(10, pad_multiple=4),))
    assert tiny.local_pieces(3, 4) == []  # all padding: 10 -> 16, rank 3 holds rows 12..15


def test_json_round_trip():
    for spec in (
        _qkv(4, 2),
        ShardSpec(0, (Segment(1001, pad_multiple=64),)),
        ShardSpec(1, (Segment(128),)),
    ):
        data = json.loads(json.dumps(spec.to_json()))
        assert ShardSpec.from_json(data) == spec
    assert _qkv(4, 1).to_json() == {
        "dim": 0,
        "segments": [
            {"size": 64, "unit": 16},
            {"size": 16, "unit": 16, "replicate": True},
            {"size": 16, "unit": 16, "replicate": True},
        ],
    }
    assert ShardSpec.replicated().to_json() == {"dim": None, "segments": []}
    assert ShardSpec.from_json({"dim": None, "segments": []}) == ShardSpec.replicated()
    with pytest.raises(ValueError, match="Malformed shard spec segment .*'stride'"):
        ShardSpec.from_json({"dim": 0, "segments": [{"size": 4, "stride": 2}]})


def test_check_tp_names_the_sizes_and_what_works():
    with pytest.raises(ValueError) as info:
        ShardSpec(0, (Segment(130),)).check_tp(4)
    assert str(info.value) == (
        "Cannot shard dimension 0 (130 rows) over tensor_parallel_size=4: 130 rows are not "
        "divisible by tensor_parallel_size=4; try 1, 2, 5, 10, 13, 26, 65 or 130."
    )
    with pytest.raises(ValueError) as info:
        ShardSpec(0, (Segment(192, 16), Segment(48, 16, replicate=True))).check_tp(2)
    assert (
        "3 units of 16 rows can neither be split over nor replicated to "
        "tensor_parallel_size=2 (one must divide the other)" in str(info.value)
    )
    assert "try 1, 3, 6 or 12" in str(info.value)
    ShardSpec(0, (Segment(1001, pad_multiple=64),)).check_tp(7)  # padding makes any size work
    with pytest.raises(ValueError, match="rank 2 is outside tensor_parallel_size=2"):
        ShardSpec(0, (Segment(8),)).local_pieces(2, 2)


def test_replicated_and_bad_specs():
    spec = ShardSpec.replicated()
    assert spec.is_replicated and get_shard_spec(torch.nn.Parameter(torch.ones(2))) == spec
    spec.check_tp(3)  # any size
    with pytest.raises(ValueError, match="replicated spec: every rank holds the whole tensor"):
        spec.local_pieces(0, 2)
    with pytest.raises(ValueError, match=r"Segment\(size=10, unit=4\)"):
        Segment(10, 4)
    with pytest.raises(ValueError, match="replicate and pad_multiple exclude each other"):
        Segment(8, replicate=True, pad_multiple=2)


def test_get_shard_dim_reads_the_spec():
    param = torch.nn.Parameter(torch.ones(4, 4))
    assert get_shard_dim(param) is None
    param.shard_spec = ShardSpec(1, (Segment(8),))
    assert get_shard_dim(param) == 1


def test_tensor_parallel_state_restores():
    with tensor_parallel_state(2, 4):
        assert get_tensor_model_parallel_rank() == 2
    assert get_tensor_model_parallel_rank() == 0
    with pytest.raises(ValueError, match="rank 4 is outside tensor_parallel_size=4"):
        with tensor_parallel_state(4, 4):
            pass


# --- every architecture: the spec describes what weight_loader loads --------------------

# name -> make_model arguments; vocab 1001 is odd (padded differently at each TP size).
MODELS = {
    "llama-gqa": dict(arch="llama", vocab_size=1000),  # 4 heads, 2 KV heads
    "llama-tied": dict(arch="llama", vocab_size=1001, tie_word_embeddings=True),
    "mistral-1kv": dict(arch="mistral", vocab_size=1000),  # 1 KV head
    "qwen2-qkv-bias": dict(arch="qwen2", vocab_size=1000),
    "gpt2-odd-vocab": dict(arch="gpt2", vocab_size=1001),  # Conv1D, tied
    "gpt_neox": dict(arch="gpt_neox", vocab_size=1000),  # per-head fused qkv, untied
    "opt": dict(arch="opt", vocab_size=1001),  # replicated project_in/out, tied
    "gpt_bigcode-mqa": dict(arch="gpt_bigcode", vocab_size=1000),  # one KV head
    "gpt_bigcode-mha": dict(arch="gpt_bigcode", vocab_size=1000, multi_query=False),
}


def _allowed_tp_sizes(arch: str, overrides: dict) -> list[int]:
    config = ModelConfig(model="unused", hf_config=make_config(arch, **overrides))
    sizes = []
    for tp in range(1, 5):
        try:
            config.verify_with_parallel_config(ParallelConfig(tensor_parallel_size=tp))
        except ValueError:
            continue
        sizes.append(tp)
    return sizes


def _build(path: str, weights: dict[str, torch.Tensor], rank: int, tp: int) -> torch.nn.Module:
    """Rank ``rank`` of TP ``tp``, built and loaded the normal way in this process."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with tensor_parallel_state(rank, tp), torch.no_grad():
        model = ModelRegistry.resolve_model_cls(config.architectures[0])(config)
        loaded = model.load_weights(iter(weights.items()))
    assert loaded == set(dict(model.named_parameters()))
    return model


def _assert_matches_global(name: str, local: torch.Tensor, full: torch.Tensor, spec, r, tp):
    if spec.is_replicated:
        torch.testing.assert_close(local, full, rtol=0, atol=0, msg=name)
        return
    dim = spec.dim
    assert local.shape[dim] == spec.local_size(tp), name
    assert full.shape[dim] >= spec.global_size, name  # TP=1 may hold vocabulary padding
    others = [s for d, s in enumerate(local.shape) if d != dim]
    assert others == [s for d, s in enumerate(full.shape) if d != dim], name
    global_tensor = full.narrow(dim, 0, spec.global_size)
    for p in spec.local_pieces(r, tp):
        got = local.narrow(dim, p.local_start, p.length)
        want = global_tensor.narrow(dim, p.global_start, p.length)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} rank {r}/{tp} {p}")


@pytest.mark.parametrize("case", sorted(MODELS))
def test_spec_matches_weight_loader(case, tmp_path):
    args = dict(MODELS[case])
    arch, vocab = args.pop("arch"), args.pop("vocab_size")
    path = make_model(arch, str(tmp_path / case), vocab_size=vocab, **args)
    weights = load_file(os.path.join(path, "model.safetensors"))
    sizes = _allowed_tp_sizes(arch, dict(args, vocab_size=vocab))
    assert sizes == [1, 2, 4], sizes  # 4 heads: TP=4 exercises KV-head replication
    reference = dict(_build(path, weights, 0, 1).named_parameters())
    specs = {name: get_shard_spec(p) for name, p in reference.items()}
    assert any(s.dim == 0 for s in specs.values()) and any(s.dim == 1 for s in specs.values())
    covered: dict[str, set[int]] = {}
    for tp in sizes:
        for r in range(tp):
            model = _build(path, weights, r, tp)
            params = dict(model.named_parameters())
            assert params.keys() == reference.keys()
            for name, local in params.items():
                spec = get_shard_spec(local)
                assert spec == specs[name], f"{name}: the spec depends on the TP size"
                assert get_shard_dim(local) == spec.dim
                _assert_matches_global(name, local, reference[name], spec, r, tp)
                if not spec.is_replicated:
                    rows = covered.setdefault(f"{name}@{tp}", set())
                    for p in spec.local_pieces(r, tp):
                        rows.update(range(p.global_start, p.global_start + p.length))
    for key, rows in covered.items():  # every global row lives on some rank
        name = key.split("@")[0]
        assert rows == set(range(specs[name].global_size)), key
