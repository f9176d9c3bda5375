"""A save killed with SIGKILL at any point leaves the target either without a loadable
checkpoint or with the complete new one, never a mix; saving again works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.sharded_state.common import greedy, make_llm, shutdown
from tests.utils import random_prompts
from vllm.entrypoints.save_sharded_state import copy_metadata_files

# Runs a save and stops at ``phase`` (after announcing it in the ``ready`` file) to be killed.
SCRIPT = """
import os, sys, time
from vllm import LLM
from vllm.model_executor.model_loader.sharded_state import directory, saver

src, out, phase, ready = sys.argv[1:5]


def stall(*args, **kwargs):
    open(ready, "w").close()
    time.sleep(600)


if phase == "writing":  # some shard files written, others not
    write_file = saver.write_file

    def write_then_stall(*args, **kwargs):
        result = write_file(*args, **kwargs)
        stall()

    saver.write_file = write_then_stall
elif phase == "before-swap":  # every file and the manifest written, not yet in place
    directory.commit = stall
elif phase == "after-swap":  # swapped into place, old contents not yet deleted
    directory.delete_files = stall

if __name__ == "__main__":
    llm = LLM(model=src, dtype="float32", max_model_len=128, num_gpu_blocks_override=64)
    os.makedirs(out, exist_ok=True)
    llm.save_sharded_state(out, max_size=50_000)
"""
PROMPTS = random_prompts(2, 1000, max_len=8)
NO_SHARDS, UNFINISHED, NO_CONFIG = "No shard files for rank 0", "unfinished save", "config"
# phase -> (why the target does not load, or None: it holds the new checkpoint; why the
# temporary directory does not load)
EXPECTED = {
    "writing": (NO_SHARDS, NO_CONFIG),
    "before-swap": (NO_SHARDS, UNFINISHED),
    "after-swap": (None, NO_SHARDS),
}


@pytest.mark.parametrize("phase", ["writing", "before-swap", "after-swap"])
def test_killed_save_leaves_nothing_loadable(model_dirs, tmp_path, phase):
    src = model_dirs("llama")
    out = tmp_path / "out"
    out.mkdir()
    copy_metadata_files(src, str(out))  # config and tokenizer there: only the shards missing
    script, ready = tmp_path / "save.py", tmp_path / "ready"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), src, str(out), phase, str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    # Why each directory does not load: the target never holds a partial set of shards.
    target_error, temp_error = EXPECTED[phase]
    if target_error is None:  # the swap happened: the new checkpoint is complete
        llm = make_llm(str(out), load_format="sharded_state")
        swapped_tokens = greedy(llm, PROMPTS)
        shutdown(llm)
    else:
        with pytest.raises(ValueError, match=target_error):
            make_llm(str(out), load_format="sharded_state")
    temp_dirs = [p for p in tmp_path.iterdir() if p.name.startswith(".out.sharded-")]
    assert len(temp_dirs) == 1  # the interrupted save's work (or, swapped, the old contents)
    with pytest.raises(ValueError, match=temp_error):
        make_llm(str(temp_dirs[0]), load_format="sharded_state")

    llm = make_llm(src)  # saving again succeeds and cleans up after the killed save
    tokens = greedy(llm, PROMPTS)
    if target_error is None:
        assert swapped_tokens == tokens
    llm.save_sharded_state(str(out))
    shutdown(llm)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    llm = make_llm(str(out), load_format="sharded_state")
    assert greedy(llm, PROMPTS) == tokens
    shutdown(llm)
