"""``vllm reshard``: sharded (TP=M) or Hugging Face input -> the files a save at TP=N
writes, byte for byte; loadable at N with the default load's tokens; memory near the
largest tensor, not the model; errors a user gets."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import pytest

from tests.sharded_state.common import ARCHS, greedy, make_llm, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files
from vllm.testing import make_model

CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main", "reshard"]


def reshard(src: str, out: str, tp: int, *extra: str, check: bool = True):
    run = subprocess.run(
        [*CLI, "--input", src, "--output", out, "--tensor-parallel-size", str(tp), *extra],
        capture_output=True,
        text=True,
    )
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def save(src: str, out: str, tp: int) -> str:
    llm = make_llm(src, tp)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    return out


def assert_same_files(a: str, b: str) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        if os.path.isfile(os.path.join(a, name)):
            assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


@pytest.fixture(scope="module")
def llama_saves(model_dirs, tmp_path_factory) -> dict[int, str]:
    src = model_dirs("llama")
    base = tmp_path_factory.mktemp("llama_saves")
    return {tp: save(src, str(base / f"tp{tp}"), tp) for tp in (2, 4)}


def test_llama_2_to_4_to_2_equals_real_saves(llama_saves, tmp_path):
    reshard(llama_saves[2], str(tmp_path / "tp4"), 4, "--verify")
    assert_same_files(llama_saves[4], str(tmp_path / "tp4"))
    reshard(str(tmp_path / "tp4"), str(tmp_path / "tp2"), 2)
    assert_same_files(llama_saves[2], str(tmp_path / "tp2"))


def test_gpt2_odd_vocab_1_to_2_to_1(model_dirs, tmp_path):
    original = save(model_dirs("gpt2"), str(tmp_path / "tp1"), 1)
    reshard(original, str(tmp_path / "tp2"), 2, "--verify")
    reshard(str(tmp_path / "tp2"), str(tmp_path / "back"), 1)
    assert_same_files(original, str(tmp_path / "back"))


def test_hf_input_equals_save_and_loads(model_dirs, llama_saves, tmp_path):
    src, out = model_dirs("llama"), str(tmp_path / "tp2")
    reshard(src, out, 2, "--dtype", "float32", "--verify")
    assert_same_files(llama_saves[2], out)
    prompts = random_prompts(3, ARCHS["llama"], max_len=12, seed=7)
    llm = make_llm(src, 2)
    want = greedy(llm, prompts)
    shutdown(llm)
    llm = make_llm(out, 2, load_format="sharded_state")
    assert greedy(llm, prompts) == want
    shutdown(llm)


def test_upstream_dir_without_manifest(llama_saves, tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    for name in os.listdir(llama_saves[2]):
        if name != "sharded_state.json":
            os.link(os.path.join(llama_saves[2], name), upstream / name)
    reshard(str(upstream), str(tmp_path / "tp4"), 4, "--verify")
    for name in os.listdir(llama_saves[4]):
        if name.endswith(".safetensors"):
            assert filecmp.cmp(
                os.path.join(llama_saves[4], name), tmp_path / "tp4" / name, shallow=False
            )


def _peak_rss_kib(cmd: list[str]) -> int:
    """Peak RSS of ``cmd`` run in a fresh child (its own RUSAGE_CHILDREN)."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_sharded_reshard_memory_is_one_tensor(tmp_path):
    # 32 layers of 4 MiB and a 8 MiB embedding: the model (~145 MiB) is far larger than
    # its largest tensor.
    src = make_model(
        "llama",
        str(tmp_path / "hf"),
        8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    reshard(src, str(tmp_path / "tp1"), 1, "--dtype", "float32")
    model_bytes = sum(
        os.path.getsize(tmp_path / "tp1" / n)
        for n in os.listdir(tmp_path / "tp1")
        if n.endswith(".safetensors")
    )
    largest = 8192 * 256 * 4
    baseline = _peak_rss_kib(
        [sys.executable, "-c", "import vllm.entrypoints.cli.main, vllm.entrypoints.reshard"]
    )
    cmd = [*CLI, "--input", str(tmp_path / "tp1"), "--output", str(tmp_path / "tp2")]
    peak = _peak_rss_kib([*cmd, "--tensor-parallel-size", "2"])
    assert model_bytes > 10 * largest
    extra = (peak - baseline) * 1024
    assert extra < 1.5 * largest + (64 << 20), (peak, baseline, model_bytes)


def test_errors(llama_saves, tmp_path):
    run = reshard(llama_saves[2], str(tmp_path / "out"), 3, check=False)
    assert run.returncode != 0
    assert "tensor_parallel_size=3" in run.stderr
    assert "can take tensor_parallel_size 1, 2, 4" in run.stderr
    assert "Traceback" not in run.stderr  # the message alone
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]

    run = reshard(llama_saves[2], os.path.join(llama_saves[2], "inner"), 4, check=False)
    assert run.returncode != 0 and "overlap" in run.stderr

    run = reshard(str(tmp_path / "nowhere"), str(tmp_path / "out"), 2, check=False)
    assert run.returncode != 0 and "is not a directory" in run.stderr


def test_verify_names_a_corrupt_file(llama_saves, tmp_path):
    from vllm.model_executor.model_loader.safetensors.format import ShardFileError
    from vllm.model_executor.model_loader.sharded_state.verify import verify_checkpoint

    out = str(tmp_path / "tp2")
    reshard(llama_saves[2], out, 2, "--verify")
    path = os.path.join(out, "model-rank-1-part-0.safetensors")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ShardFileError, match="model-rank-1-part-0.safetensors has CRC-32"):
        verify_checkpoint(out)


def test_save_with_verify_rereads_files(model_dirs, tmp_path, monkeypatch):
    from vllm.model_executor.model_loader.sharded_state import saver

    ranks = []
    real = saver.verify_rank
    monkeypatch.setattr(saver, "verify_rank", lambda *a: ranks.append(a[2]) or real(*a))
    llm = make_llm(model_dirs("llama"), 1, model_loader_extra_config={"verify": True})
    llm.save_sharded_state(str(tmp_path / "out"))
    shutdown(llm)
    assert ranks == [0]
