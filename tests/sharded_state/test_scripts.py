"""upstream's examples/offline_inference/save_sharded_state.py and `vllm save-sharded-state`,
run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.sharded_state.common import greedy, make_llm, shard_files, shutdown
from tests.utils import device_for, random_prompts
from vllm.entrypoints.cli.main import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join("examples", "offline_inference", "save_sharded_state.py")
DEVICE = device_for(2)  # every engine here on one device, as the tokens are compared
ENGINE_FLAGS = ["--max-model-len", "128", "--num-gpu-blocks-override", "64", "--dtype", "float32",
                "--device", DEVICE]  # fmt: skip
PROMPTS = random_prompts(3, 1000, max_len=10)


@pytest.fixture(scope="module")
def model_with_extras(model_dirs, tmp_path_factory):
    """The llama model plus what real model directories carry besides weights."""
    path = str(tmp_path_factory.mktemp("extras") / "model")
    shutil.copytree(model_dirs("llama"), path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "model.safetensors"}}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{{ messages }}")
    os.makedirs(os.path.join(path, "original"))
    with open(os.path.join(path, "original", "params.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(path, "original", "consolidated.00.pth"), "wb") as f:
        f.write(b"weights")
    return path


@pytest.fixture(scope="module")
def reference_tokens(model_dirs):
    llm = make_llm(model_dirs("llama"), device=DEVICE)
    tokens = greedy(llm, PROMPTS)
    shutdown(llm)
    return tokens


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _check_copied(out: str) -> None:
    names = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "original"} <= names
    assert "model.safetensors" not in names and "model.safetensors.index.json" not in names
    assert os.listdir(os.path.join(out, "original")) == ["params.json"]


def test_example_script_tp2(model_with_extras, reference_tokens, tmp_path):
    out = str(tmp_path / "out")
    _run(
        [
            sys.executable,
            EXAMPLE,
            "--model",
            model_with_extras,
            "--tensor-parallel-size",
            "2",
            "--output",
            out,
            "--max-file-size",
            "60000",
            *ENGINE_FLAGS,
        ]
    )
    _check_copied(out)
    files = shard_files(out)
    for rank in (0, 1):
        parts = [n for n in files if n.startswith(f"model-rank-{rank}-part-")]
        assert len(parts) > 1 and all(files[n] for n in parts)
    llm = make_llm(out, 2, load_format="sharded_state")
    assert greedy(llm, PROMPTS) == reference_tokens
    shutdown(llm)


def test_cli_save_sharded_state(model_with_extras, reference_tokens, tmp_path):
    out = str(tmp_path / "out")
    exe = shutil.which("vllm")
    cmd = [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    pattern = "cli-{rank}-{part}.safetensors"
    _run(
        [
            *cmd,
            "save-sharded-state",
            "--model",
            model_with_extras,
            "-o",
            out,
            "--file-pattern",
            pattern,
            *ENGINE_FLAGS,
        ]
    )
    _check_copied(out)
    assert list(shard_files(out)) == ["cli-0-0.safetensors"]
    # The manifest supplies the pattern.
    llm = make_llm(out, load_format="sharded_state", device=DEVICE)
    assert greedy(llm, PROMPTS) == reference_tokens
    shutdown(llm)


def test_refuses_non_directory_model_and_lora(model_dirs, tmp_path):
    not_dir = tmp_path / "model.safetensors"
    not_dir.write_bytes(b"")
    with pytest.raises(ValueError, match="must be a local model directory"):
        cli_main(["save-sharded-state", "--model", str(not_dir), "-o", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="enable_lora=True is not supported"):
        cli_main(
            [
                "save-sharded-state",
                "--model",
                model_dirs("llama"),
                "--enable-lora",
                "-o",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(SystemExit):
        cli_main(["save-sharded-state", "--model", model_dirs("llama")])  # --output required
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--file-pattern", "shard-{rank}.safetensors"], "must contain {rank} and {part}"),
        (["--file-pattern", "../x-{rank}-{part}"], "must be a file name, not a path"),
        (["--max-file-size", "0"], "max_size must be at least 1 byte, got 0"),
    ],
)
def test_bad_save_options_are_refused_before_loading(model_dirs, tmp_path, flags, message):
    """Checked before the model loads (here it could not: the directory has no weights),
    and no output directory is left behind."""
    no_weights = tmp_path / "model"
    shutil.copytree(model_dirs("llama"), no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        cli_main(["save-sharded-state", "--model", str(no_weights), "-o", str(out), *flags])
    assert not out.exists()
    with pytest.raises(ValueError, match="it is the root directory"):  # the target, too
        cli_main(["save-sharded-state", "--model", str(no_weights), "-o", "/"])


def test_example_script_quantization_as_its_usage_text(model_dirs, tmp_path):
    """The example's own usage: ``--quantization deepspeedfp --tensor-parallel-size N``,
    then ``LLM(model=out, load_format="sharded_state", quantization="deepspeedfp",
    tensor_parallel_size=N)``, which must give the quantize-after-load engine's tokens."""
    model, out = model_dirs("llama"), str(tmp_path / "out")
    _run([sys.executable, EXAMPLE, "--model", model, "--quantization", "deepspeedfp",
          "--tensor-parallel-size", "2", "--output", out, *ENGINE_FLAGS])  # fmt: skip
    with open(os.path.join(out, "sharded_state.json")) as f:
        assert json.load(f)["quantization"] == "deepspeedfp"
    llm = make_llm(model, 2, quantization="deepspeedfp", device=DEVICE)
    expected = greedy(llm, PROMPTS)
    shutdown(llm)
    llm = make_llm(out, 2, load_format="sharded_state", quantization="deepspeedfp", device=DEVICE)
    assert greedy(llm, PROMPTS) == expected
    shutdown(llm)
