"""On the CPU, sharded_state maps the shard files instead of reading them (mmap).

Mapped parameters must behave exactly like loaded ones: same bytes, same greedy tokens,
writable without touching the file; and the engine falls back to reading where mapping
would cost memory (weights repacked after loading) or cannot check checksums.
"""

from __future__ import annotations

import functools
import os
import shutil
import zlib

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.sharded_state import common, worker_fns
from tests.sharded_state.common import ARCHS, greedy, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files
from vllm.model_executor.model_loader.safetensors.format import PAGE_SIZE, read_header_json
from vllm.model_executor.model_loader.sharded_state import loader as sharded_state_loader

make_llm = functools.partial(common.make_llm, device="cpu")  # mapping is for CPU weights


def mapped_shards(worker) -> list[str]:
    """Shard files this rank's process has mapped (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if ".safetensors" in line}
    return sorted(os.path.basename(p) for p in paths)


def shard_mappings(worker) -> list[tuple[str, int, bool]]:
    """(file, file offset, holds every parameter) per mapping of a shard file."""
    out = []
    ptrs = [p.data_ptr() for p in worker.model.parameters()]
    with open("/proc/self/maps") as f:
        for line in f:
            if ".safetensors" in line:
                span, _, offset, *_, path = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                inside = all(lo <= p < hi for p in ptrs)
                out.append((os.path.basename(path), int(offset, 16), inside))
    return out


def replace_first_param(worker) -> None:
    """Give a parameter new memory, outside the model's weight block."""
    param = next(worker.model.parameters())
    param.data = param.data.clone() + 1


def bump_first_param(worker) -> None:
    """Write into a mapped parameter (a copy-on-write page)."""
    param = next(worker.model.parameters())
    param.data.view(-1)[0] += 1


@pytest.fixture(scope="module", autouse=True)
def plain_16bit_weights():
    """Keep bfloat16 weights row-major: on CPUs that multiply bfloat16 natively (AVX512-BF16,
    AMX) linear layers otherwise repack them for oneDNN, and repacked weights are read,
    not mapped (``test_float32_repacked_weights_are_read_unless_mmap_is_asked``)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_ONEDNN_LINEAR", "0")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model_dirs):
    """(source dir, sharded dir saved in bfloat16 at TP=1, greedy tokens, state digest)."""
    src = model_dirs("llama")
    out = str(tmp_path_factory.mktemp("llama-bf16") / "sharded")
    prompts = random_prompts(4, ARCHS["llama"], max_len=12, seed=0)
    llm = make_llm(src, dtype="bfloat16")
    tokens, digest = greedy(llm, prompts), llm.collective_rpc(worker_fns.state_digest)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    return src, out, prompts, tokens, digest


def test_bf16_load_maps_files_and_matches(saved):
    _, out, prompts, tokens, digest = saved
    llm = make_llm(out, dtype="bfloat16", load_format="sharded_state")
    assert llm.collective_rpc(mapped_shards) == [["model-rank-0-part-0.safetensors"]]
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    assert greedy(llm, prompts) == tokens
    shutdown(llm)


def test_bf16_load_maps_the_data_in_one_piece_over_the_weights(saved):
    """The file's data (after its page-aligned header) replaces the model's weight block
    in one mapping, which holds every parameter."""
    _, out, prompts, tokens, digest = saved
    path = os.path.join(out, "model-rank-0-part-0.safetensors")
    _, data_start, _ = read_header_json(path)
    assert data_start % PAGE_SIZE == 0
    llm = make_llm(out, dtype="bfloat16", load_format="sharded_state")
    assert llm.collective_rpc(shard_mappings) == [
        [("model-rank-0-part-0.safetensors", data_start, True)]
    ]
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    assert greedy(llm, prompts) == tokens
    shutdown(llm)


@pytest.mark.parametrize("layout", ["upstream", "parts"])
def test_other_layouts_map_per_tensor_and_match(saved, tmp_path, layout):
    """Files not laid out as the model's block (upstream's save, several parts per rank)
    still map, tensor by tensor, and load the same model."""
    src, out, prompts, tokens, digest = saved
    other = str(tmp_path / layout)
    if layout == "upstream":  # safetensors' own writer, no manifest
        os.makedirs(other)
        name = "model-rank-0-part-0.safetensors"
        with safe_open(os.path.join(out, name), framework="pt") as f:
            save_file({k: f.get_tensor(k) for k in f.keys()}, os.path.join(other, name))
    else:
        llm = make_llm(out, dtype="bfloat16", load_format="sharded_state")
        llm.save_sharded_state(other, max_size=200_000)
        shutdown(llm)
    copy_metadata_files(src, other)
    names = sorted(n for n in os.listdir(other) if n.endswith(".safetensors"))
    assert len(names) == (1 if layout == "upstream" else 3)
    llm = make_llm(other, dtype="bfloat16", load_format="sharded_state")
    mappings = llm.collective_rpc(shard_mappings)[0]
    assert sorted(name for name, offset, _ in mappings) == names
    assert all(offset == 0 for _, offset, _ in mappings)  # whole files, not one block
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    assert greedy(llm, prompts) == tokens
    shutdown(llm)


def test_a_parameter_given_new_memory_is_saved_and_loaded(saved, tmp_path):
    """A parameter moved out of the block is saved from where it is now; the file is still
    laid out as a fresh model's block and maps in one piece."""
    src, out, *_ = saved
    again = str(tmp_path / "again")
    llm = make_llm(out, dtype="bfloat16", load_format="sharded_state")
    llm.collective_rpc(replace_first_param)
    digest = llm.collective_rpc(worker_fns.state_digest)
    llm.save_sharded_state(again)
    shutdown(llm)
    copy_metadata_files(src, again)
    llm = make_llm(again, dtype="bfloat16", load_format="sharded_state")
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    [[(_, offset, inside)]] = llm.collective_rpc(shard_mappings)
    assert offset > 0 and inside
    shutdown(llm)


def test_writing_a_mapped_parameter_leaves_the_file_alone(saved):
    _, out, *_ = saved
    path = os.path.join(out, "model-rank-0-part-0.safetensors")
    before = zlib.crc32(open(path, "rb").read())
    llm = make_llm(out, dtype="bfloat16", load_format="sharded_state")
    digest = llm.collective_rpc(worker_fns.state_digest)
    llm.collective_rpc(bump_first_param)
    assert llm.collective_rpc(worker_fns.state_digest) != digest  # the model changed ...
    assert zlib.crc32(open(path, "rb").read()) == before  # ... the checkpoint did not
    shutdown(llm)


@pytest.mark.parametrize("extra", [{}, {"mmap": False}, {"verify": True}])
def test_a_file_laid_out_as_the_block_loads_without_per_tensor_work(saved, monkeypatch, extra):
    """Mapped, read or verified, the file moves in one piece: the per-tensor header
    checks never run (TP 1 runs in this process)."""
    _, out, prompts, tokens, digest = saved

    def per_tensor(*args):
        raise AssertionError("per-tensor path taken")

    monkeypatch.setattr(sharded_state_loader, "_check_headers", per_tensor)
    llm = make_llm(out, dtype="bfloat16", load_format="sharded_state",
                   model_loader_extra_config=extra)  # fmt: skip
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    assert greedy(llm, prompts) == tokens
    shutdown(llm)


def test_verify_names_a_flipped_byte_in_a_file_read_in_one_piece(saved, tmp_path):
    src, out, *_ = saved
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    with open(os.path.join(bad, "model-rank-0-part-0.safetensors"), "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ValueError, match="Checksum mismatch for .*model-rank-0-part-0"):
        make_llm(bad, dtype="bfloat16", load_format="sharded_state",
                 model_loader_extra_config={"verify": True})  # fmt: skip


def test_mmap_false_and_verify_read_instead(saved):
    _, out, prompts, tokens, digest = saved
    for extra in ({"mmap": False}, {"verify": True}):
        llm = make_llm(out, dtype="bfloat16", load_format="sharded_state",
                       model_loader_extra_config=extra)  # fmt: skip
        assert llm.collective_rpc(mapped_shards) == [[]], extra
        assert llm.collective_rpc(worker_fns.state_digest) == digest, extra
        shutdown(llm)


def test_float32_repacked_weights_are_read_unless_mmap_is_asked(model_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_ONEDNN_LINEAR")  # repacking on, as by default
    src = model_dirs("llama")
    out = str(tmp_path / "sharded")
    prompts = random_prompts(3, ARCHS["llama"], max_len=10, seed=1)
    llm = make_llm(src)
    tokens = greedy(llm, prompts)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    llm = make_llm(out, load_format="sharded_state")  # float32: linear weights repacked
    assert llm.collective_rpc(mapped_shards) == [[]]
    shutdown(llm)
    llm = make_llm(out, load_format="sharded_state", model_loader_extra_config={"mmap": True})
    assert llm.collective_rpc(mapped_shards) == [["model-rank-0-part-0.safetensors"]]
    assert greedy(llm, prompts) == tokens
    shutdown(llm)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"mmap": "yes"}, "'mmap' must be true or false, got 'yes'"),
        ({"mmap": True, "verify": True}, "'mmap' and 'verify' exclude each other"),
    ],
)
def test_bad_mmap_options(saved, extra, match):
    with pytest.raises(ValueError, match=match):
        make_llm(saved[1], dtype="bfloat16", load_format="sharded_state",
                 model_loader_extra_config=extra)  # fmt: skip


def test_tied_embeddings_at_tp2_map_and_match(model_dirs, tmp_path):
    """GPT-2 ties lm_head to the embedding: one mapped tensor serves both names."""
    src = model_dirs("gpt2")
    out = str(tmp_path / "sharded")
    prompts = random_prompts(3, ARCHS["gpt2"], max_len=10, seed=2)
    llm = make_llm(src, 2, dtype="bfloat16")
    tokens, digest = greedy(llm, prompts), llm.collective_rpc(worker_fns.state_digest)
    llm.save_sharded_state(out)
    shutdown(llm)
    copy_metadata_files(src, out)
    llm = make_llm(out, 2, dtype="bfloat16", load_format="sharded_state")
    assert llm.collective_rpc(mapped_shards) == [
        [f"model-rank-{r}-part-0.safetensors"] for r in range(2)
    ]
    assert llm.collective_rpc(worker_fns.state_digest) == digest
    assert greedy(llm, prompts) == tokens
    shutdown(llm)
