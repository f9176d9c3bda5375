"""Scripts written for current upstream vLLM run unchanged here.

Each script in tests/upstream_scripts/ makes the API calls one upstream example (or test)
makes: the same imports, call shapes and CLI flags. They run as a user runs them, in a
subprocess, against one tiny local model with a chat template.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from vllm.testing import make_model

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_scripts")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
SMALL = ["--max-model-len", "128", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny llama whose tokenizer has a chat template (written as chat_template.jinja)."""
    from transformers import AutoTokenizer

    path = make_model("llama", str(tmp_path_factory.mktemp("upstream") / "llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def run(script: str, *args: str, cwd: str | None = None) -> str:
    """Run tests/upstream_scripts/<script> with ``args``; its stdout, once it exited 0."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="0.25", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def generated_texts(stdout: str, label: str) -> list[str]:
    """What follows ``label:`` on each line that has it (the scripts print reprs)."""
    texts = re.findall(rf"{label}:\s*(.*)$", stdout, re.M)
    assert texts, stdout
    return texts


def test_basic(model: str, tmp_path) -> None:
    # LLM(model="facebook/opt-125m"): a hub-style name that names a local directory.
    os.makedirs(tmp_path / "facebook")
    os.symlink(model, tmp_path / "facebook" / "opt-125m")
    stdout = run("basic.py", cwd=str(tmp_path))
    assert len(generated_texts(stdout, "Output")) == 2


def test_generate_with_default_sampling_params(model: str) -> None:
    stdout = run("generate.py", "--model", model, "--max-tokens", "5", "--top_k", "3", *SMALL)
    assert len(generated_texts(stdout, "Generated text")) == 2


def test_chat(model: str) -> None:
    template = os.path.join(model, "chat_template.jinja")
    stdout = run(
        "chat.py", "--model", model, "--max-tokens", "5", "--chat-template-path", template, *SMALL
    )
    # One conversation, a batch of three, the batch again with the template from the file.
    assert len(generated_texts(stdout, "Generated text")) == 7
    assert "<s>user: Hello\\n<s>assistant: Hello! How can I assist you today?" in stdout


def test_llm_engine_example(model: str) -> None:
    stdout = run("llm_engine_example.py", "--model", model, *SMALL)
    finished = re.findall(r"RequestOutput\(request_id='(\d)'", stdout)
    assert sorted(finished) == ["0", "1", "2"], stdout
    assert stdout.count("CompletionOutput(index=") == 4  # n=2 on the last prompt


def test_save_and_load_sharded_state(model: str, tmp_path) -> None:
    out = str(tmp_path / "sharded")
    tp = ["--tensor-parallel-size", "2"]
    stdout = run("save_sharded_state.py", "--model", model, "--output", out, *tp, *SMALL)
    assert "model-rank-1-part-0.safetensors" in stdout and "chat_template.jinja" in stdout
    greedy = ["--temperature", "0", "--max-tokens", "12", "--prompt", "The future of AI is"]
    loaded = run("load_sharded_state.py", "--model", out, *tp, *greedy, *SMALL)
    original = run(
        "load_sharded_state.py", "--model", model, "--load-format", "auto", *tp, *greedy, *SMALL
    )
    assert "using format sharded_state" in loaded and "using format auto" in original
    assert generated_texts(loaded, "Full output") == generated_texts(original, "Full output")


def test_sharded_state_loader_test(model: str) -> None:
    stdout = run("sharded_state_loader.py", model, "1")
    assert "outputs equal before and after the sharded save" in stdout
