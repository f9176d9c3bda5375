"""Many clients at once share the engine's steps; nothing is lost or crossed, and a client
that leaves mid-stream frees what its request held."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.entrypoints.openai.conftest import SERVED_NAMES
from tests.utils import random_prompts
from vllm import SamplingParams

MODEL = SERVED_NAMES[0]
NUM_CLIENTS = 64


def test_64_concurrent_streams(server, offline_llm):
    prompts = random_prompts(NUM_CLIENTS, 512, min_len=2, max_len=40, seed=11)
    max_tokens = [4 + (7 * i) % 29 for i in range(NUM_CLIENTS)]  # 4..32, mixed
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    offline = offline_llm.generate([{"prompt_token_ids": p} for p in prompts], params, False)
    expected = [o.outputs[0].text for o in offline]
    before = server.metrics()

    async def one(client, i: int) -> tuple[str, int, float]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage, first = "", None, None
        async for chunk in stream:
            if chunk.choices:
                first = first or time.monotonic()
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return text, usage.completion_tokens, first

    async def run():
        client = server.get_async_client(timeout=300)
        start = time.monotonic()
        results = await asyncio.gather(*(one(client, i) for i in range(NUM_CLIENTS)))
        return start, results

    start, results = asyncio.run(run())
    for i, (text, completion_tokens, _) in enumerate(results):
        assert text == expected[i], f"request {i}"
        assert completion_tokens == max_tokens[i], f"request {i}"
    # Requests shared steps: every client had its first token before the slowest finished.
    assert max(first for *_, first in results) - start < 0.9 * (time.monotonic() - start)

    after = server.metrics()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta['vllm:request_success_total{finished_reason="length"}'] == NUM_CLIENTS
    assert delta["vllm:e2e_request_latency_seconds_count"] == NUM_CLIENTS
    assert delta["vllm:time_to_first_token_seconds_count"] == NUM_CLIENTS
    assert delta["vllm:generation_tokens_total"] == sum(max_tokens)
    assert delta["vllm:prompt_tokens_total"] == sum(len(p) for p in prompts)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def _wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        idle = metrics["vllm:num_requests_running"] == 0 == metrics["vllm:kv_cache_usage_perc"]
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_disconnect_aborts_request(server):
    before = server.metrics()
    body = dict(model=MODEL, prompt="Hello", max_tokens=240, temperature=0, ignore_eos=True)
    with httpx.stream(
        "POST", server.url_for("v1", "completions"), json={**body, "stream": True}, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        busy = server.metrics()
        assert busy["vllm:num_requests_running"] == 1 and busy["vllm:kv_cache_usage_perc"] > 0
    # The connection is closed here, long before 240 tokens.
    after = _wait_idle(server)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    finished = 'vllm:request_success_total{finished_reason="length"}'
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert after[finished] == before[finished]  # aborted, not run to its end
    assert after[aborted] == before[aborted] + 1
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 200

    # Several prompts in one streamed request: all of them are aborted.
    before = after
    body_two = {**body, "prompt": ["Hello", "The future"], "stream": True}
    with httpx.stream(
        "POST", server.url_for("v1", "completions"), json=body_two, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(line for line in lines if line.startswith("data: "))
    after = _wait_idle(server)
    assert after["vllm:num_requests_running"] == 0
    assert after[aborted] == before[aborted] + 2
    assert after[finished] == before[finished]

    # The same for a request that is not streamed: the client gives up waiting.
    before = after
    with httpx.Client(timeout=0.1) as client:
        try:
            client.post(server.url_for("v1", "completions"), json=body)
        except httpx.TimeoutException:
            pass
    after = _wait_idle(server)
    assert after["vllm:num_requests_running"] == 0
    assert after[finished] == before[finished]
    assert after[aborted] == before[aborted] + 1
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 200
    assert httpx.post(
        server.url_for("v1", "completions"), json={**body, "max_tokens": 2}
    ).is_success
    assert "Traceback" not in server.log()  # a client leaving is not a server error
