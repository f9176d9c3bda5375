"""Bad input gets OpenAI's error body with a message that says what is wrong, and the
server keeps serving: every refused request is followed by one that succeeds."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, SERVED_NAMES
from tests.entrypoints.openai.server import RemoteOpenAIServer

MODEL = SERVED_NAMES[0]
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url_for(*path.split("/")), timeout=30, **kwargs)


def assert_still_serving(server) -> None:
    response = post(server, "v1/completions", json=OK)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert isinstance(error["type"], str)
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


BAD_COMPLETIONS = {
    "negative temperature": ({"temperature": -1}, ["temperature", "non-negative", "-1"]),
    "top_p above 1": ({"top_p": 1.5}, ["top_p", "(0, 1]", "1.5"]),
    "top_k below -1": ({"top_k": -5}, ["top_k", "-5"]),
    "min_p above 1": ({"min_p": 2}, ["min_p", "[0, 1]"]),
    "presence_penalty out of range": ({"presence_penalty": 3}, ["presence_penalty", "[-2, 2]"]),
    "n zero": ({"n": 0}, ["n must be at least 1"]),
    "max_tokens zero": ({"max_tokens": 0}, ["max_tokens", "at least 1"]),
    "max_tokens past the context": (
        {"max_tokens": MAX_MODEL_LEN},
        [f"maximum context length is {MAX_MODEL_LEN}", f"{MAX_MODEL_LEN + 2} tokens"],
    ),
    "too many logprobs": ({"logprobs": 50}, ["logprobs=50", "max_logprobs=20"]),
    "max_tokens of the wrong type": ({"max_tokens": "many"}, ["max_tokens", "integer", "many"]),
    "temperature of the wrong type": ({"temperature": [1]}, ["temperature"]),
    "prompt of the wrong type": ({"prompt": {"text": "hi"}}, ["prompt"]),
    "empty prompt": ({"prompt": []}, ["prompt"]),
    "token id outside the vocabulary": ({"prompt": [5, 100000]}, ["100000", "vocabulary"]),
    "stop of the wrong type": ({"stop": 7}, ["stop"]),
    "unsupported suffix": ({"suffix": "!"}, ["suffix is not supported"]),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, ["stream"]),
}


@pytest.mark.parametrize("case", list(BAD_COMPLETIONS))
def test_bad_completion_request(server, case):
    fields, fragments = BAD_COMPLETIONS[case]
    assert_error(post(server, "v1/completions", json={**OK, **fields}), 400, *fragments)
    assert_still_serving(server)


def test_prompt_longer_than_max_model_len(server):
    prompt = list(range(2, 2 + MAX_MODEL_LEN + 10))
    error = assert_error(
        post(server, "v1/completions", json={**OK, "prompt": prompt}),
        400,
        f"maximum context length is {MAX_MODEL_LEN}",
        f"{MAX_MODEL_LEN + 10} tokens",
    )
    assert error["param"] == "prompt"
    # The same through the openai client, streaming: refused before any event is sent.
    client = openai.OpenAI(base_url=server.url_for("v1"), api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, stream=True)
    assert_still_serving(server)


def test_malformed_json(server):
    for body in (b'{"model": "tiny-llama", "prompt": "Hi",', b"not json", b"[1, 2]"):
        response = post(
            server, "v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert_error(response, 400)
        assert_still_serving(server)
    assert_error(
        post(server, "v1/completions", content=b"{", headers={"content-type": "application/json"}),
        400,
        "not valid JSON",
    )


def test_unknown_model(server):
    error = assert_error(
        post(server, "v1/completions", json={**OK, "model": "llama-70b"}),
        404,
        "'llama-70b' does not exist",
        "tiny-llama",
    )
    assert error["type"] == "NotFoundError"
    assert_error(
        post(server, "v1/chat/completions", json={"model": "x", "messages": []}), 404, "'x'"
    )
    assert_still_serving(server)


def test_bad_chat_request(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    cases = [
        ({"messages": "hello"}, ["messages"]),
        ({"messages": [{"content": "no role"}]}, ["role"]),
        ({"temperature": -0.5}, ["temperature"]),
        ({"top_logprobs": 3}, ["top_logprobs needs logprobs=true"]),
        ({"tools": [{"type": "function"}]}, ["tools is not supported"]),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, ["only text"]),
    ]
    for fields, fragments in cases:
        assert_error(post(server, "v1/chat/completions", json={**chat, **fields}), 400, *fragments)
        response = post(server, "v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text


def test_bad_tokenizer_requests(server):
    assert_error(post(server, "detokenize", json={"tokens": [1, 10**9]}), 400, "vocabulary")
    assert_error(post(server, "tokenize", json={"prompt": 5}), 400)
    assert post(server, "tokenize", json={"prompt": "ok"}).status_code == 200


def test_api_key_and_missing_chat_template(model_dir):
    """A server started with --api-key (and no chat template, which the tiny tokenizer lacks)."""
    args = ["--max-model-len", "128", "--enable-log-requests"]
    with RemoteOpenAIServer(model_dir, args, api_key="sekret") as server:
        url = server.url_for("v1", "completions")
        body = {"prompt": "Hello", "max_tokens": 2}
        assert_error(httpx.post(url, json=body), 401, "API key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(httpx.post(url, json=body, headers=wrong), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=server.url_for("v1"), api_key="nope", max_retries=0
            ).models.list()
        client = server.get_client()  # the right key
        assert client.completions.create(model=model_dir, **body).usage.completion_tokens >= 1
        assert "Received request cmpl-" in server.log()  # --enable-log-requests
        assert httpx.get(server.url_for("health")).status_code == 200  # open without a key
        with pytest.raises(openai.BadRequestError, match="no chat template.*--chat-template"):
            client.chat.completions.create(
                model=model_dir, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        assert client.completions.create(model=model_dir, **body).usage.completion_tokens >= 1
