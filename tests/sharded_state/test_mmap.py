"""On the CPU, sharded_state maps the shard files instead of reading them (mmap).

Mapped parameters must behave exactly like loaded ones: same bytes, same greedy tokens,
writable without touching the file; and the engine falls back to reading where mapping
would cost memory (weights repacked after loading) or cannot check checksums.
"""

from __future__ import annotations

import os
import zlib

import pytest

from tests.sharded_state import worker_fns
from tests.sharded_state.common import ARCHS, greedy, make_llm, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files


def mapped_shards(worker) -> list[str]:
    """Shard files this rank's process has mapped (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if ".safetensors" in line}
    return sorted(os.path.basename(p) for p in paths)


def bump_first_param(worker) -> None:
    """Write into a mapped parameter (a copy-on-write page)."""
    param = next(worker.model.parameters())
    param.data.view(-1)[0] += 1


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


def test_mmap_false_and_verify_read_instead(saved):
    _, out, prompts, tokens, digest = saved
    for extra in ({"mmap": False}, {"verify": True}):
        llm = make_llm(out, dtype="bfloat16", load_format="sharded_state",
                       model_loader_extra_config=extra)  # fmt: skip
        assert llm.collective_rpc(mapped_shards) == [[]], extra
        assert llm.collective_rpc(worker_fns.state_digest) == digest, extra
        shutdown(llm)


def test_float32_repacked_weights_are_read_unless_mmap_is_asked(model_dirs, tmp_path):
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
