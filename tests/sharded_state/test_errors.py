"""The errors a user gets from a bad sharded-state directory or call, each naming the file
or key at fault; and what a save leaves behind (old shards replaced, other files kept)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.sharded_state import worker_fns
from tests.sharded_state.common import greedy, make_llm, shard_files, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files

PART0 = "model-rank-0-part-0.safetensors"
MANIFEST = "sharded_state.json"
PROMPTS = random_prompts(2, 1000, max_len=8)


@pytest.fixture(scope="module")
def source(model_dirs):
    """(model dir, a TP=1 engine on it, its greedy tokens) shared by this module's tests."""
    src = model_dirs("llama")
    llm = make_llm(src)
    yield src, llm, greedy(llm, PROMPTS)
    shutdown(llm)


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory) -> str:
    """A complete TP=1 checkpoint in several parts; tests damage copies of it."""
    src, llm, _ = source
    out = str(tmp_path_factory.mktemp("saved") / "ckpt")
    llm.save_sharded_state(out, max_size=100_000)
    copy_metadata_files(src, out)
    return out


@pytest.fixture
def ckpt(saved, tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved, path)
    return path


def _load(path: str, **kwargs):
    llm = make_llm(path, load_format="sharded_state", **kwargs)
    return llm


def _edit_manifest(path: str, **changes) -> None:
    manifest_path = os.path.join(path, MANIFEST)
    manifest = json.load(open(manifest_path))
    manifest.update(changes)
    json.dump(manifest, open(manifest_path, "w"))


def _rewrite(path: str, name: str, change) -> None:
    """Rewrite one shard file with ``change(tensors)`` applied (as another tool might)."""
    tensors = load_file(os.path.join(path, name))
    change(tensors)
    save_file(tensors, os.path.join(path, name))


def test_loads_and_matches(source, ckpt):
    llm = _load(ckpt, model_loader_extra_config={"verify": True})
    assert greedy(llm, PROMPTS) == source[2]
    shutdown(llm)


def test_unknown_extra_config_key(ckpt):
    with pytest.raises(ValueError, match="'patern'"):
        _load(ckpt, model_loader_extra_config={"patern": "x-{rank}-{part}"})
    with pytest.raises(ValueError, match="'verify' must be true or false"):
        _load(ckpt, model_loader_extra_config={"verify": "yes"})


def test_pattern_without_rank_and_part_is_refused(source, ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"must contain \{rank\} and \{part\}"):
        _load(ckpt, model_loader_extra_config={"pattern": "model-{rank}.safetensors"})
    with pytest.raises(ValueError, match=r"must contain \{rank\} and \{part\}"):
        source[1].save_sharded_state(str(tmp_path / "x"), pattern="model.safetensors")
    assert not (tmp_path / "x").exists()


def test_pattern_differing_from_manifest(ckpt):
    with pytest.raises(ValueError, match="differs from the pattern"):
        _load(ckpt, model_loader_extra_config={"pattern": "w-{rank}-{part}.safetensors"})


def test_no_shard_files_for_rank(ckpt):
    os.remove(os.path.join(ckpt, MANIFEST))
    for name in shard_files(ckpt):
        os.rename(os.path.join(ckpt, name), os.path.join(ckpt, name.replace("rank-0", "rank-1")))
    with pytest.raises(ValueError, match=r"No shard files for rank 0 .*'model-rank-0-part-\*"):
        _load(ckpt)
    with pytest.raises(ValueError, match=r"rank\(s\) 1: was it saved with a different tensor"):
        _load(ckpt)


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (
            {"tensor_parallel_size": 2},
            {},
            "No shard files for rank 1 in .* lists none for this rank .*saved at "
            "tensor_parallel_size=2",
        ),
        ({}, {"dtype": "bfloat16"}, "dtype=float32, but the engine uses dtype=bfloat16"),
        (
            {},
            {"quantization": "fp8"},
            "saved with quantization=None .its sharded_state.json., but quantization='fp8' "
            "was passed; pass quantization=None or leave it unset",
        ),
        (
            {"quantization": "int8"},
            {"quantization": "fp8"},
            "saved with quantization='int8' .its sharded_state.json., but quantization='fp8'",
        ),
        (
            {"architecture": "GPT2LMHeadModel"},
            {},
            "from architecture GPT2LMHeadModel, but its config names LlamaForCausalLM",
        ),
    ],
    ids=["tp", "dtype", "quantization", "other-quantization", "architecture"],
)
def test_configuration_mismatch_names_both_values(ckpt, change, kwargs, message):
    _edit_manifest(ckpt, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _load(ckpt, **kwargs)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_file_name_outside_the_directory_is_refused(ckpt, tmp_path, where):
    """A manifest may only name the files its pattern gives: a path to a shard elsewhere
    (here a valid one, of the same model) must not be loaded."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(os.path.join(ckpt, PART0), outside / PART0)
    name = f"../elsewhere/{PART0}" if where == "relative" else str(outside / PART0)
    manifest_path = os.path.join(ckpt, MANIFEST)
    manifest = json.load(open(manifest_path))
    manifest["files"][name] = manifest["files"].pop(PART0)
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError, match=f"is corrupt .*{name!r}.* names '{PART0}'"):
        _load(ckpt)


def test_truncated_file(ckpt):
    path = os.path.join(ckpt, PART0)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match=f"{PART0} is .* bytes but sharded_state.json records"):
        _load(ckpt)
    os.remove(os.path.join(ckpt, MANIFEST))  # without a manifest the header gives it away
    with pytest.raises(ValueError, match=f"{PART0} is truncated: its header describes"):
        _load(ckpt)


def test_checksum_mismatch_when_verifying(ckpt):
    path = os.path.join(ckpt, PART0)
    with open(path, "r+b") as f:  # same size, one byte of data flipped
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=f"Checksum mismatch for .*{PART0}"):
        _load(ckpt, model_loader_extra_config={"verify": True})


def test_missing_keys(ckpt):
    os.remove(os.path.join(ckpt, MANIFEST))
    _rewrite(ckpt, PART0, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match="Missing keys .*: model.embed_tokens.weight"):
        _load(ckpt)


def test_unexpected_keys(ckpt):
    os.remove(os.path.join(ckpt, MANIFEST))
    _rewrite(ckpt, PART0, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=f"Unexpected keys .*model.extra.weight \\(in .*{PART0}"):
        _load(ckpt)


def test_shape_mismatch(ckpt):
    os.remove(os.path.join(ckpt, MANIFEST))
    name = "model.embed_tokens.weight"
    _rewrite(ckpt, PART0, lambda t: t.update({name: t[name][:512]}))
    with pytest.raises(
        ValueError,
        match=f"Shape mismatch for {name} in .*{PART0}: the file "
        r"holds \[512, 64\], the model expects \[1024, 64\]",
    ):
        _load(ckpt)


def test_without_manifest_loads_with_a_warning(source, ckpt, caplog, monkeypatch):
    """A directory saved by upstream vLLM has no manifest: it loads, unverified."""
    os.remove(os.path.join(ckpt, MANIFEST))
    for name in shard_files(ckpt):  # written the way upstream writes them
        _rewrite(ckpt, name, lambda tensors: None)
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="vllm"):
        llm = _load(ckpt)
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)
    assert greedy(llm, PROMPTS) == source[2]
    shutdown(llm)


def test_unfinished_save_is_refused(ckpt):
    open(os.path.join(ckpt, ".sharded_state.incomplete"), "w").close()
    with pytest.raises(ValueError, match="unfinished save_sharded_state"):
        _load(ckpt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the weight block
def test_save_refuses_state_that_would_not_load(model_dirs, tmp_path, dtype):
    llm = make_llm(model_dirs("llama"), dtype=dtype)
    name = "model.layers.0.mlp.down_proj.weight"
    llm.collective_rpc(worker_fns.reshape_param, args=(name,))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        RuntimeError,
        match=f"would not load: Shape mismatch for {name} in .*: the file holds \\[128, 64\\]",
    ):
        llm.save_sharded_state(str(out))
    shutdown(llm)
    assert os.listdir(out) == [] and os.listdir(tmp_path) == ["out"]  # nothing left behind


def test_bad_save_arguments(source, tmp_path):
    llm = source[1]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        llm.save_sharded_state(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="max_size must be a number of bytes"):
        llm.save_sharded_state(str(tmp_path / "x"), max_size="5GB")


def test_saving_again_replaces_old_shards(source, ckpt):
    src, llm, tokens = source
    (open(os.path.join(ckpt, "notes.txt"), "w")).write("kept")
    assert len(shard_files(ckpt)) > 1
    llm.save_sharded_state(ckpt, pattern="again-{rank}-{part}.safetensors")
    assert list(shard_files(ckpt)) == ["again-0-0.safetensors"]
    llm.save_sharded_state(ckpt)  # files listed by the old manifest go too
    assert list(shard_files(ckpt)) == [PART0]
    assert open(os.path.join(ckpt, "notes.txt")).read() == "kept"
    assert "config.json" in os.listdir(ckpt)
    assert [n for n in os.listdir(os.path.dirname(ckpt)) if n.startswith(".")] == []
    loaded = _load(ckpt)
    assert greedy(loaded, PROMPTS) == tokens
    shutdown(loaded)


def test_saving_into_a_mount_point_replaces_in_place(source, ckpt, monkeypatch):
    """Where the target cannot be swapped (its parent is not writable), files move in one
    by one."""
    from vllm.model_executor.model_loader.sharded_state import directory

    src, llm, tokens = source
    monkeypatch.setattr(directory, "_can_swap", lambda target: False)
    inode = os.stat(ckpt).st_ino
    llm.save_sharded_state(ckpt, pattern="inplace-{rank}-{part}.safetensors")
    assert os.stat(ckpt).st_ino == inode  # the same directory, not a swapped-in one
    assert list(shard_files(ckpt)) == ["inplace-0-0.safetensors"]
    assert "config.json" in os.listdir(ckpt)
    assert [n for n in os.listdir(ckpt) if n.startswith(".")] == []
    loaded = _load(ckpt)
    assert greedy(loaded, PROMPTS) == tokens
    shutdown(loaded)


def test_relative_path_is_the_callers_at_tp2(model_dirs, tmp_path, monkeypatch):
    """Workers started in another directory: a relative save path still means the caller's
    current directory, at TP=2 as at TP=1."""
    llm = make_llm(model_dirs("llama"), tp=2)
    try:
        caller = tmp_path / "caller"
        caller.mkdir()
        monkeypatch.chdir(caller)  # after the workers started
        llm.save_sharded_state("relative-out")
    finally:
        shutdown(llm)
    assert sorted(os.listdir(caller / "relative-out")) == [
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
        MANIFEST,
    ]


@pytest.fixture
def mount_in_ckpt(ckpt):
    """A real tmpfs mounted at ``ckpt/data`` (mounting needs root, as CI has)."""
    data = os.path.join(ckpt, "data")
    os.mkdir(data)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", data], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield data
    subprocess.run(["umount", "-l", data], check=False)


def test_mount_point_inside_the_target_is_refused_and_kept(source, ckpt, mount_in_ckpt):
    """A save swaps the target's contents out and deletes them: with a mount inside, that
    would delete another filesystem's files. It is refused, and nothing is touched."""
    _, llm, _ = source
    precious = os.path.join(mount_in_ckpt, "precious.txt")
    with open(precious, "w") as f:
        f.write("keep me")
    before = sorted(os.listdir(ckpt))
    with pytest.raises(ValueError, match=f"{mount_in_ckpt} inside it is a mount point"):
        llm.save_sharded_state(ckpt)
    assert sorted(os.listdir(ckpt)) == before
    assert open(precious).read() == "keep me"
    assert os.path.ismount(mount_in_ckpt)


def test_mount_point_is_refused_as_a_target(source, mount_in_ckpt):
    _, llm, _ = source
    with pytest.raises(ValueError, match=f"Cannot save a sharded state to {mount_in_ckpt}: it is"):
        llm.save_sharded_state(mount_in_ckpt)
    assert os.listdir(mount_in_ckpt) == []


def test_root_is_refused_as_a_target(source):
    _, llm, _ = source
    with pytest.raises(ValueError, match="Cannot save a sharded state to /: it is the root"):
        llm.save_sharded_state("/")


def test_file_created_while_the_save_finishes_is_kept(source, ckpt, monkeypatch):
    """A file that appears in the target after its other files were carried over, just
    before the swap, must not be deleted with the replaced contents."""
    from vllm.model_executor.model_loader.sharded_state import directory

    _, llm, tokens = source
    real_commit = directory.commit

    def commit_after_a_write(tmp: str, target: str):
        with open(os.path.join(target, "late-notes.txt"), "w") as f:
            f.write("written during the save")
        return real_commit(tmp, target)

    monkeypatch.setattr(directory, "commit", commit_after_a_write)
    llm.save_sharded_state(ckpt)
    with open(os.path.join(ckpt, "late-notes.txt")) as f:
        assert f.read() == "written during the save"
    assert [n for n in os.listdir(os.path.dirname(ckpt)) if n.startswith(".")] == []
    loaded = _load(ckpt)
    assert greedy(loaded, PROMPTS) == tokens
    shutdown(loaded)
