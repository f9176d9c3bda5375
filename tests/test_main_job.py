"""The README's main job, examples/offline_inference/basic.py, as a user runs it: a GGUF
model (with its own tokenizer and chat template) answers, is saved sharded, and loads back
from the shards with identical answers; each rank's load is reported.

The real model (SmolLM2-135M-Instruct at TP=3) takes a minute on two cores; here a tiny
GGUF written like llama.cpp's converter stands in, at TP=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gguf import GGMLQuantizationType

from tests.models.gguf_files import write_gguf
from vllm.testing import make_model

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "offline_inference", "basic.py")


def test_main_job_round_trip(tmp_path):
    hf_dir = make_model("llama", str(tmp_path / "hf"), vocab_size=512)
    path = write_gguf(hf_dir, str(tmp_path / "tiny.gguf"), GGMLQuantizationType.Q8_0, True)
    out = tmp_path / "sharded"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--model", path, "--tensor-parallel-size", "2",
         "--max-tokens", "8", "--max-model-len", "256", "--output", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert "Answers after the sharded load (TP=2) identical: True" in stdout
    assert stdout.count("\nQ: ") == 3 and "\nA: " in stdout
    # The load table: each rank of each load, with the bytes it read.
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("gguf ", "sharded"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("gguf", "0"), ("gguf", "1"), ("sharded_state", "0"), ("sharded_state", "1"),
    ]  # fmt: skip
    assert all(float(r[3]) > 0 for r in rows)
    # The kept checkpoint loads alone: shards of both ranks, manifest, config, tokenizer.
    manifest = json.loads((out / "sharded_state.json").read_text())
    assert manifest["tensor_parallel_size"] == 2
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(out / name), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
