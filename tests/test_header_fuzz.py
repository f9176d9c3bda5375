"""Property tests of the safetensors header parser (against the safetensors library) and
of the sharded-state manifest reader.

Random and mutated headers (lengths, offsets, dtypes, shapes, JSON structure, names with
'/', '..' or NUL) must either read exactly what ``safetensors`` reads, or be refused with
the project's ``ShardFileError`` naming the file: never another exception, never a
silent difference. The number of examples is bounded so that this runs in seconds.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from vllm.model_executor.model_loader.safetensors.format import ShardFileError, read_header
from vllm.model_executor.model_loader.safetensors.slices import SafetensorsFile
from vllm.model_executor.model_loader.sharded_state.manifest import MANIFEST_NAME, read_manifest

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "XX", "", 5]
NAMES = ["a", "b", "c", "../x", "/abs", "a/b", "nul\x00name", "", "__metadata__"]


def _base() -> tuple[dict, bytes]:
    """The header and data section of a valid file of three small tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "base.safetensors")
        tensors = {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.arange(4, dtype=torch.int64),
            "c": torch.ones(3, dtype=torch.float16),
        }
        save_file(tensors, path, metadata={"format": "pt"})
        raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


BASE_HEADER, BASE_DATA = _base()

offsets = st.lists(st.integers(-8, 80), min_size=0, max_size=3)
shapes = st.lists(st.integers(-2, 12), min_size=0, max_size=3)
entry_edits = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPE_NAMES),
        "shape": shapes | st.just("2x3") | st.none(),
        "data_offsets": offsets | st.just("0:8"),
    },
)
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), st.sampled_from(["a", "b", "c"]), entry_edits),
        st.tuples(st.just("drop"), st.sampled_from(["a", "b", "c", "__metadata__"])),
        st.tuples(st.just("rename"), st.sampled_from(["a", "b", "c"]), st.sampled_from(NAMES)),
        st.tuples(st.just("not-a-dict"), st.sampled_from(["a", "__metadata__"])),
        st.tuples(st.just("data"), st.integers(-12, 12)),
    ),
    max_size=4,
)


def _apply(mutation_list: list) -> tuple[dict, bytes]:
    header = json.loads(json.dumps(BASE_HEADER))
    data = BASE_DATA
    for m in mutation_list:
        if m[0] == "edit" and isinstance(header.get(m[1]), dict):
            header[m[1]].update(m[2])
        elif m[0] == "drop":
            header.pop(m[1], None)
        elif m[0] == "rename" and m[1] in header:
            header[m[2]] = header.pop(m[1])
        elif m[0] == "not-a-dict":
            header[m[1]] = [1, 2]
        elif m[0] == "data":  # a longer or shorter data section
            data = data + b"\0" * m[1] if m[1] >= 0 else data[: m[1]]
    return header, data


def _write(path: str, header_bytes: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def _read_with_safetensors(path: str) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def _read_with_ours(path: str) -> dict[str, torch.Tensor] | None:
    try:
        header = read_header(path)
    except ShardFileError as e:
        assert path in str(e), f"the error does not name the file: {e}"
        return None
    with SafetensorsFile(path) as f:
        return {e.name: f.get_slice(e.name)[...].clone() for e in header.tensors}


def _check(path: str) -> None:
    ours = _read_with_ours(path)
    if ours is None:
        return  # refused: always allowed
    theirs = _read_with_safetensors(path)
    assert theirs is not None, f"accepted a file safetensors refuses: {open(path, 'rb').read()!r}"
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


@SETTINGS
@given(mutations)
def test_mutated_headers_read_as_safetensors_or_are_refused(tmp_path_factory, mutation_list):
    header, data = _apply(mutation_list)
    path = str(tmp_path_factory.mktemp("fuzz") / "f.safetensors")
    text = json.dumps(header).encode()
    _write(path, text + b" " * (-len(text) % 8), data)
    _check(path)


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 200), st.binary(max_size=64))
def test_random_bytes_are_refused_by_name(tmp_path_factory, header_bytes, claimed, data):
    """Random header bytes and header lengths that lie about the file."""
    path = str(tmp_path_factory.mktemp("fuzz") / "r.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", claimed) + header_bytes + data)
    _check(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(NAMES + ["ffff"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES), inner),
    max_leaves=6,
)
file_entries = st.fixed_dictionaries(
    {},
    optional={
        "rank": st.integers(-1, 2) | json_values,
        "part": st.integers(-1, 2) | json_values,
        "size": st.integers(0, 99) | json_values,
        "crc32": st.sampled_from(["0", "deadbeef", "xyz", 7]),
    },
)
manifests = st.fixed_dictionaries(
    {},
    optional={
        "pattern": st.sampled_from(
            ["model-rank-{rank}-part-{part}.safetensors", "{rank}/{part}", "x-{rank}", 3]
        ),
        "files": st.dictionaries(
            st.sampled_from(NAMES + ["model-rank-0-part-0.safetensors"]), file_entries
        )
        | json_values,
    },
)


@SETTINGS
@given(manifests)
def test_manifest_reader_refuses_by_name_or_lists_only_pattern_names(tmp_path_factory, manifest):
    """A manifest that reads lists only the file names its pattern gives; any other is
    refused as corrupt, naming the manifest."""
    directory = tmp_path_factory.mktemp("manifest")
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest))
    try:
        read = read_manifest(str(directory))
    except ShardFileError as e:
        assert str(path) in str(e)
        return
    for name, info in read.files.items():
        assert name == read.pattern.format(rank=info.rank, part=info.part)
        assert "/" not in name and name not in ("", ".", "..")
