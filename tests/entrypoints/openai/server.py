"""A real ``vllm serve`` subprocess for tests, started the way a user starts it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from vllm.utils import get_open_port

START_TIMEOUT_S = 180.0


class RemoteOpenAIServer:
    """``vllm serve MODEL --host 127.0.0.1 --port <free> ARGS``, ready once /health is 200.

    Its output goes to a file (``log``), shown in the error when it fails to start.
    """

    def __init__(
        self,
        model: str,
        args: list[str] = (),
        api_key: str | None = None,
        module_entrypoint: bool = False,
    ) -> None:
        """``module_entrypoint``: start ``python -m vllm.entrypoints.openai.api_server --model``
        instead of ``vllm serve``."""
        self.port = get_open_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        if module_entrypoint:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        else:
            exe = shutil.which("vllm")
            assert exe is not None, "the `vllm` command is not on PATH: run `pip install -e .`"
            cmd = [exe, "serve", model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self.proc.returncode}:\n{self.log()}"
                )
            try:
                if httpx.get(self.url_for("health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()

    def url_for(self, *parts: str) -> str:
        return "/".join([self.base_url, *parts])

    def get_client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url_for("v1"), api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    def get_async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url_for("v1"), api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {'name{label="value"}': value}, the ``model_name`` label left out."""
        text = httpx.get(self.url_for("metrics"), timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(
                    f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name"
                )
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code (kills after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def __enter__(self) -> RemoteOpenAIServer:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._log.close()
