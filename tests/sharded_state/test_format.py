"""The format's pieces without an engine: subtensor filtering, patterns, parts, files."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader.safetensors.format import ShardFileError, read_header
from vllm.model_executor.model_loader.safetensors.reader import read_tensors
from vllm.model_executor.model_loader.safetensors.writer import write_file
from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader
from vllm.model_executor.model_loader.sharded_state.manifest import (
    DEFAULT_PATTERN,
    Manifest,
    ManifestFile,
    ManifestTensor,
    find_rank_files,
    validate_pattern,
)
from vllm.model_executor.model_loader.sharded_state.saver import split_parts

filter_subtensors = ShardedStateLoader._filter_subtensors


def test_filter_subtensors_upstream_case():
    state = {"a": torch.empty(2), "b": torch.empty((2, 4)), "c": torch.empty((2, 4, 8))}
    state.update({"x": state["b"], "y": state["c"][1, 2, :], "z": state["c"][1, :, 4]})
    filtered = filter_subtensors(state)
    assert tuple(filtered) == ("a", "b", "c")
    assert all(filtered[k] is state[k] for k in filtered)


def test_filter_subtensors_alias_keeps_smaller_key():
    w = torch.empty(8, 4)
    state = {"model.embed_tokens.weight": w, "lm_head.weight": w, "other": w.view(32)}
    assert list(filter_subtensors(state)) == ["lm_head.weight"]


def test_filter_subtensors_empty_tensor_is_dropped():
    # Upstream's rule: an empty tensor holds no bytes, so nothing is saved or asked for.
    state = {"e": torch.empty(0), "f": torch.empty(3, 0), "a": torch.empty(3)}
    assert list(filter_subtensors(state)) == ["a"]


def test_filter_subtensors_non_contiguous_views():
    c = torch.empty(4, 6)
    # A transposed alias spans the same bytes but is not contiguous: the original is kept.
    assert list(filter_subtensors({"t": c.t(), "c": c})) == ["c"]
    # A strided column inside c is covered by c.
    assert list(filter_subtensors({"c": c, "col": c[:, 1]})) == ["c"]
    # A non-contiguous view that no contiguous tensor covers is kept (and saved as a copy).
    alone = torch.empty(4, 6)[:, :3]
    assert list(filter_subtensors({"alone": alone})) == ["alone"]
    # Overlapping slices, neither covering the other: both kept.
    flat = torch.empty(10)
    assert list(filter_subtensors({"p": flat[:6], "q": flat[4:]})) == ["p", "q"]


def _covered_by_rule(key, t, state):
    """The documented rule, pair by pair: is ``t`` dropped in favour of another tensor?"""

    def span(x):
        last = sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()

    a, b = span(t)
    for key2, t2 in state.items():
        a2, b2 = span(t2)
        if key2 == key or not t2.is_contiguous() or not (a2 <= a and b <= b2):
            continue
        if (a2, b2) != (a, b) or not t.is_contiguous() or key2 < key:
            return True
    return False


@pytest.mark.parametrize("seed", range(20))
def test_filter_subtensors_many_views_of_one_storage(seed):
    # What a model mapped from one file looks like: hundreds of views of one storage.
    # Random slices, aliases, strided views and exact duplicates, against the rule.
    g = torch.Generator().manual_seed(seed)
    base = torch.empty(64, 16)
    flat = base.view(-1)
    state = {}

    def r(n):
        return int(torch.randint(n, (1,), generator=g))

    for _ in range(300):
        kind, lo = r(4), r(64)
        hi = lo + 1 + r(64 - lo)
        if kind == 0:
            t = base[lo:hi]  # contiguous rows
        elif kind == 1:
            t = base[lo:hi, : 1 + r(16)]  # strided unless all columns
        elif kind == 2:
            t = flat[lo * 16 + r(16) : hi * 16]  # contiguous, unaligned start
        else:
            t = base[lo:hi].t()  # same bytes as rows lo:hi, not contiguous
        state[f"t{r(400):03d}"] = t
    expected = [k for k, t in state.items() if not _covered_by_rule(k, t, state)]
    assert list(filter_subtensors(state)) == expected
    assert expected  # the whole-span tensors survive


def test_filter_subtensors_mapped_file_keeps_every_tensor(tmp_path):
    # The sharded-state loader maps a file: every tensor is a view of one storage, none
    # covering another, so re-saving the model must keep them all.
    path = str(tmp_path / "f.safetensors")
    tensors = {f"w{i:04d}": torch.full((3, 5), float(i)) for i in range(2000)}
    save_file(tensors, path)
    from vllm.model_executor.model_loader.safetensors.mapping import map_file

    mapped = map_file(read_header(path))
    assert len({t.untyped_storage().data_ptr() for t in mapped.values()}) == 1
    filtered = filter_subtensors(mapped)
    assert list(filtered) == list(mapped)
    assert all(torch.equal(filtered[k], tensors[k]) for k in tensors)


def test_filter_subtensors_on_meta_device():
    with torch.device("meta"):
        w, v = torch.empty(8, 4), torch.empty(8, 4)
    state = {"b": w, "a": w, "v": v, "row": v[1]}
    assert list(filter_subtensors(state)) == ["a", "v"]


@pytest.mark.parametrize(
    "pattern",
    [
        "model.safetensors",
        "model-{rank}.safetensors",
        "model-{part}.safetensors",
        "{rank}-{part}-{other}.safetensors",
        "sub/{rank}-{part}.safetensors",
        "{rank}-{part",
    ],
)
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="pattern"):
        validate_pattern(pattern)


def test_find_rank_files_orders_parts_and_ignores_other_ranks(tmp_path):
    for name in ["w-1-10.st", "w-1-2.st", "w-11-0.st", "w-1-x.bin", "w-0-0.st"]:
        (tmp_path / name).write_bytes(b"")
    found = find_rank_files(str(tmp_path), validate_pattern("w-{rank}-{part}.st"), 1)
    assert [os.path.basename(p) for p in found] == ["w-1-2.st", "w-1-10.st"]


def test_split_parts_never_empty_and_oversized_alone():
    state = {
        "a": torch.empty(10),
        "big": torch.empty(100),
        "b": torch.empty(10),
        "c": torch.empty(10),
        "d": torch.empty(30),
    }
    parts = split_parts(state, max_size=100)  # float32: 40, 400, 40, 40, 120 bytes
    assert [[k for k, _ in p] for p in parts] == [["a"], ["big"], ["b", "c"], ["d"]]
    assert split_parts(state, None) == [list(state.items())]
    assert all(len(p) == 1 for p in split_parts(state, 1))


def test_write_file_is_standard_safetensors(tmp_path):
    path = str(tmp_path / "x.safetensors")
    tensors = {
        "scalar": torch.tensor(1.0),
        "half": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    size, crc = write_file(path, tensors.items())
    data = open(path, "rb").read()
    assert size == len(data) and crc == zlib.crc32(data)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
    header = read_header(path)
    targets = {
        k: torch.empty_like(t, memory_format=torch.contiguous_format) for k, t in tensors.items()
    }
    targets["strided"] = torch.empty(3, 4).t()  # a non-contiguous destination
    assert read_tensors([header], targets, [crc], num_threads=2) == size  # verifying reads it all
    assert all(torch.equal(targets[k], t) for k, t in tensors.items())


def test_read_header_names_truncated_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": torch.zeros(64)}, path)  # upstream-style file, written by safetensors
    assert read_header(path).tensors[0].name == "w"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ShardFileError, match="t.safetensors is truncated"):
        read_header(path)
    with open(path, "wb") as f:
        f.write(b"\x01\x02")
    with pytest.raises(ShardFileError, match="t.safetensors is truncated"):
        read_header(path)


def test_each_rank_lists_only_its_own_files(model_dirs, tmp_path):
    """Rank 1 of a TP=2 checkpoint opens rank 1's files and nothing else."""
    src = model_dirs("llama")
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            (out / name).write_bytes((open(os.path.join(src, name), "rb")).read())
    files = {}
    for rank in (0, 1):
        for part in (0, 1):
            name = f"model-rank-{rank}-part-{part}.safetensors"
            save_file({"w": torch.zeros(4)}, str(out / name))
            files[name] = {
                "rank": rank,
                "part": part,
                "size": os.path.getsize(out / name),
                "crc32": "0",
            }
    manifest = {
        "format_version": 1,
        "architecture": "LlamaForCausalLM",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "dtype": "float32",
        "quantization": None,
        "pattern": "model-rank-{rank}-part-{part}.safetensors",
        "files": files,
        "tensors": {},
    }
    (out / "sharded_state.json").write_text(json.dumps(manifest))
    config = EngineArgs(
        model=str(out), dtype="float32", tensor_parallel_size=2, load_format="sharded_state"
    ).create_engine_config()
    loader = ShardedStateLoader(config.load_config)
    manifest, pattern, saved_tp = loader._saved_layout(config, str(out))
    assert saved_tp == 2
    got = [os.path.basename(p) for p, _ in loader._rank_files(str(out), manifest, pattern, 1)]
    assert got == ["model-rank-1-part-0.safetensors", "model-rank-1-part-1.safetensors"]


def test_manifest_is_json_with_a_line_per_tensor():
    """The manifest reads back as the same JSON and the same ``Manifest``, and each file
    and tensor is one line (``grep down_proj sharded_state.json`` shows one tensor per
    hit)."""
    tensors = {
        f"layers.{i}.w": ManifestTensor("bfloat16", [2, i], [2, i * 2], 1 if i else None)
        for i in range(5)
    }
    tensors["layers.0.w"].local_shapes = [[2, 0], [2, 1]]
    files = {"model-rank-0-part-0.safetensors": ManifestFile(0, 0, 4096, 0xDEADBEEF, ["a"])}
    manifest = Manifest("LlamaForCausalLM", 2, 1, "bfloat16", None, DEFAULT_PATTERN, files, tensors)
    text = manifest.to_json()
    data = json.loads(text)
    assert list(data) == [
        "format", "format_version", "architecture", "tensor_parallel_size",
        "pipeline_parallel_size", "dtype", "quantization", "quantization_config", "pattern",
        "checksum", "files", "tensors",
    ]  # fmt: skip
    assert data["files"]["model-rank-0-part-0.safetensors"]["crc32"] == "deadbeef"
    assert data["tensors"]["layers.0.w"]["local_shapes"] == [[2, 0], [2, 1]]
    assert "local_shapes" not in data["tensors"]["layers.1.w"]
    assert Manifest.from_json(text) == manifest
    lines = [line for line in text.splitlines() if '"layers.' in line]
    assert len(lines) == 5 and all(json.loads("{" + ln.rstrip(",") + "}") for ln in lines)
