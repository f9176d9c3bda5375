"""/v1/chat/completions and the tokenizer endpoints against a real `vllm serve`."""

from __future__ import annotations

import httpx

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, SERVED_NAMES
from vllm import SamplingParams

MODEL = SERVED_NAMES[0]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world, this is a small engine"},
]


def tokenize_chat(server, messages, **kwargs) -> list[int]:
    body = {"model": MODEL, "messages": messages, **kwargs}
    return httpx.post(server.url_for("tokenize"), json=body, timeout=30).json()["tokens"]


def test_chat_renders_template_and_matches_offline(server, offline_llm):
    client = server.get_client()
    ids = tokenize_chat(server, MESSAGES)
    rendered = offline_llm.get_tokenizer().decode(ids)
    assert rendered.startswith("<s>system: You are terse.\n<s>user: Hello world")
    assert rendered.endswith("<s>assistant:")  # add_generation_prompt defaults to true
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    (want,) = offline_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)

    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 10)

    # max_tokens (the older name) works the same; a stop string ends with "stop".
    text = want.outputs[0].text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].isalnum())
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stop=stop,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].message.content == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_chat_without_generation_prompt(server):
    with_prompt = tokenize_chat(server, MESSAGES)
    without = tokenize_chat(server, MESSAGES, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    client = server.get_client()
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, extra_body={"add_generation_prompt": False}
    )
    assert out.usage.prompt_tokens == len(without)


def test_chat_logprobs(server):
    out = server.get_client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the likeliest token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )


def test_chat_streaming(server):
    client = server.get_client()
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, n=2)
    full = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    texts, roles, reasons = {0: "", 1: ""}, {}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        assert chunk.object == "chat.completion.chunk"
        if choice.delta.role:
            roles[choice.index] = choice.delta.role
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert reasons == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert chunks[-1].usage.completion_tokens == 24


def test_tokenize_detokenize_roundtrip(server, offline_llm):
    text = "The quick brown fox jumps over the lazy dog."
    resp = httpx.post(server.url_for("tokenize"), json={"model": MODEL, "prompt": text}).json()
    assert resp["tokens"] == offline_llm.get_tokenizer().encode(text)
    assert (resp["count"], resp["max_model_len"]) == (len(resp["tokens"]), MAX_MODEL_LEN)
    plain = httpx.post(
        server.url_for("tokenize"), json={"prompt": text, "add_special_tokens": False}
    ).json()
    back = httpx.post(server.url_for("detokenize"), json={"tokens": plain["tokens"]}).json()
    assert back["prompt"] == text


def test_prefix_cache_metrics_count_tokens_found_cached(server, offline_llm):
    prompt = [300 + i for i in range(40)]  # token ids: two full 16-token blocks and a rest
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    before = server.metrics()
    client = server.get_client()
    texts = []
    for _ in range(2):
        resp = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts.append(resp.choices[0].text)
    after = server.metrics()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:prefix_cache_queries_total"] == 80
    assert delta["vllm:prefix_cache_hits_total"] == 32  # the second request's two blocks
    expected = offline_llm.generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0].text
    assert texts == [expected, expected]


def test_health_version_metrics(server):
    assert httpx.get(server.url_for("health")).status_code == 200
    assert httpx.get(server.url_for("version")).json()["version"]
    before = server.metrics()
    server.get_client().completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True}
    )
    after = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):  # fmt: skip
        assert after[name] == 0  # idle again
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:prompt_tokens_total"] == 2  # "Hello" with BOS
    assert delta["vllm:generation_tokens_total"] == 4
    assert delta['vllm:request_success_total{finished_reason="length"}'] == 1
    assert delta["vllm:time_to_first_token_seconds_count"] == 1
    assert delta["vllm:inter_token_latency_seconds_count"] == 3
    assert delta["vllm:e2e_request_latency_seconds_count"] == 1
    assert delta["vllm:request_prompt_tokens_sum"] == 2
    assert delta["vllm:request_generation_tokens_sum"] == 4
