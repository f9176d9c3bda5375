"""A TP=2 server from a sharded-state checkpoint; SIGTERM with requests in flight; a
worker that dies. Every case ends with no process of the server left."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.entrypoints.openai.server import RemoteOpenAIServer
from vllm import SamplingParams

TP_ARGS = ["--tensor-parallel-size", "2", "--max-model-len", "256", "--device", "cpu"]
PROMPTS = ["Hello, my name is", "The future of AI is"]


@pytest.fixture(scope="module")
def sharded_dir(model_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sharded") / "tp2")
    subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "save-sharded-state",
         "--model", model_dir, "--output", out, *TP_ARGS],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def server_processes(server: RemoteOpenAIServer) -> list[psutil.Process]:
    parent = psutil.Process(server.proc.pid)
    return [parent, *parent.children(recursive=True)]


def assert_all_gone(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes left behind: {alive}"


def test_tp2_sharded_state_server_answers_and_stops_on_sigterm(sharded_dir, offline_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline_llm.generate(PROMPTS, params, False)]
    args = [*TP_ARGS, "--load-format", "sharded_state"]
    with RemoteOpenAIServer(sharded_dir, args) as server:  # stopped even if a check fails
        procs = server_processes(server)
        assert len(procs) >= 3  # the server and one worker per rank
        client = server.get_client()
        out = client.completions.create(
            model=sharded_dir, prompt=PROMPTS, max_tokens=10, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.text for c in out.choices] == expected

        # SIGTERM while a long stream is being read: the stream ends, the server exits.
        events: list[str] = []
        streaming = threading.Event()

        def read_stream() -> None:
            body = dict(prompt="Hello", max_tokens=240, stream=True, ignore_eos=True)
            with httpx.stream(
                "POST", server.url_for("v1", "completions"), json=body, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert streaming.wait(30)
        start = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=30)
        reader.join(10)
        assert not reader.is_alive()
        assert code in (0, -signal.SIGTERM), server.log()
        assert time.monotonic() - start < 20
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in events[-2]  # the aborted stream says why it ended
        assert len(events) < 200
        assert_all_gone(procs)
        assert "Traceback" not in server.log()


def test_worker_death_fails_requests_and_health(model_dir):
    with RemoteOpenAIServer(model_dir, TP_ARGS, module_entrypoint=True) as server:
        procs = server_processes(server)
        url = server.url_for("v1", "completions")
        assert httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}).is_success
        workers = [p for p in procs[1:] if "resource_tracker" not in " ".join(p.cmdline())]
        workers[-1].kill()

        assert httpx.get(server.url_for("health")).status_code == 503
        response = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 503
        error = response.json()["error"]["message"]
        assert "worker rank" in error and "SIGKILL" in error, error
        code = server.stop(signal.SIGTERM, timeout=30)
        assert code in (0, -signal.SIGTERM), server.log()
        assert_all_gone(procs)
