"""/v1/completions through the official openai client against a real `vllm serve`."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, SERVED_NAMES
from tests.utils import random_prompts
from vllm import SamplingParams

MODEL = SERVED_NAMES[0]
TEXT_PROMPTS = ["Hello, my name is", "The capital of France is", "Paged attention keeps"]


def offline_texts(llm, prompts, max_tokens: int | list[int]) -> list[str]:
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_models(server):
    models = server.get_client().models.list().data
    assert [m.id for m in models] == SERVED_NAMES
    assert all(m.max_model_len == MAX_MODEL_LEN for m in models)


def test_greedy_text_equals_llm_generate(server, offline_llm):
    client = server.get_client()
    expected = offline_texts(offline_llm, TEXT_PROMPTS, 12)
    extra = {"ignore_eos": True}
    for prompt, want in zip(TEXT_PROMPTS, expected):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
        )
        assert out.choices[0].text == want
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == len(offline_llm.get_tokenizer().encode(prompt))
    # Several prompts in one request: one choice each, in order.
    out = client.completions.create(
        model=SERVED_NAMES[1], prompt=TEXT_PROMPTS, max_tokens=12, temperature=0, extra_body=extra
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == expected
    assert out.model == MODEL  # responses name the first served name
    assert out.usage.completion_tokens == 36


def test_token_id_prompts(server, offline_llm):
    client = server.get_client()
    prompts = random_prompts(3, 512, seed=3)
    expected = offline_texts(offline_llm, [{"prompt_token_ids": p} for p in prompts], 8)
    extra = {"ignore_eos": True}
    one = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0, extra_body=extra
    )
    assert one.choices[0].text == expected[0]
    assert one.usage.prompt_tokens == len(prompts[0])
    many = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=8, temperature=0, extra_body=extra
    )
    assert [c.text for c in many.choices] == expected


def test_sampling_fields(server):
    client = server.get_client()
    kwargs = dict(model=MODEL, prompt=TEXT_PROMPTS[0], max_tokens=10, temperature=1.0, top_p=0.9)
    extra = {"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True}
    a = client.completions.create(**kwargs, seed=7, n=3, extra_body=extra)
    b = client.completions.create(**kwargs, seed=7, n=3, extra_body=extra)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces
    assert len({c.text for c in a.choices}) > 1  # the n samples differ
    assert a.usage.completion_tokens == 30
    penalized = client.completions.create(
        **kwargs, seed=7, presence_penalty=1.5, frequency_penalty=1.5, extra_body=extra
    )
    assert penalized.choices[0].finish_reason == "length"


def test_stop_echo_logprobs(server, offline_llm):
    client = server.get_client()
    (full,) = offline_texts(offline_llm, [TEXT_PROMPTS[1]], 20)
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].isalnum())
    out = client.completions.create(
        model=MODEL, prompt=TEXT_PROMPTS[1], max_tokens=20, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.text == full[: full.index(stop)]
    assert choice.finish_reason == "stop"

    out = client.completions.create(
        model=MODEL, prompt=TEXT_PROMPTS[1], max_tokens=5, temperature=0, echo=True
    )
    assert out.choices[0].text.startswith(TEXT_PROMPTS[1])

    out = client.completions.create(
        model=MODEL, prompt=TEXT_PROMPTS[1], max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == out.choices[0].text
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert lp <= 0
        # The top 3 (plus the sampled token if not among them); tokens that decode to the
        # same text (bytes of one character) share one key in OpenAI's format.
        assert 1 <= len(top) <= 4
        assert top[token] == pytest.approx(lp)
        assert max(top.values()) == pytest.approx(lp)  # greedy: the sampled token is the top one
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_logprobs_scores_the_prompt(server, offline_llm):
    """echo + logprobs: the prompt's tokens come first, scored as LLM's prompt_logprobs."""
    client = server.get_client()
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=2)
    (offline,) = offline_llm.generate(TEXT_PROMPTS[0], params, use_tqdm=False)
    num_prompt = len(offline.prompt_token_ids)
    kwargs = dict(model=MODEL, prompt=TEXT_PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    out = client.completions.create(**kwargs, logprobs=2)
    streamed = list(client.completions.create(**kwargs, logprobs=2, stream=True))
    first = streamed[0].choices[0].logprobs
    for logprobs in (out.choices[0].logprobs, first):
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        want = [offline.prompt_logprobs[i][t].logprob for i, t in
                enumerate(offline.prompt_token_ids) if i]  # fmt: skip
        assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(want, abs=1e-4)
    full = out.choices[0].logprobs
    assert len(full.tokens) == num_prompt + 4
    assert "".join(full.tokens) == out.choices[0].text
    assert full.text_offset == sorted(full.text_offset)
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed) == num_prompt + 4


def test_streaming(server, offline_llm):
    client = server.get_client()
    (want,) = offline_texts(offline_llm, [TEXT_PROMPTS[2]], 24)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=TEXT_PROMPTS[2], max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == want
    assert len(text_chunks) == 24  # a chunk per token, even one whose text is not settled
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices
    assert (usage.completion_tokens, usage.total_tokens) == (24, 24 + usage.prompt_tokens)


def test_stream_sends_tokens_while_generating(server):
    """The first chunk arrives while the request is still running, not after it ends."""
    with httpx.stream(
        "POST",
        server.url_for("v1", "completions"),
        json=dict(model=MODEL, prompt="Hello", max_tokens=200, temperature=0, stream=True,
                  ignore_eos=True),
        timeout=60,
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        assert server.metrics()["vllm:num_requests_running"] == 1
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


def test_streaming_n_and_several_prompts(server, offline_llm):
    client = server.get_client()
    expected = offline_texts(offline_llm, TEXT_PROMPTS[:2], 10)
    texts = {i: "" for i in range(4)}
    stream = client.completions.create(
        model=MODEL, prompt=TEXT_PROMPTS[:2], n=2, max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    # Choice i*n + j is sample j of prompt i; greedy samples are all the same.
    assert [texts[i] for i in range(4)] == [expected[0]] * 2 + [expected[1]] * 2


def test_streaming_choices_that_end_apart(server):
    """Seeded samples cut by a stop string end at different steps: each choice gets its
    text and exactly one finishing chunk, as without streaming."""
    kwargs = dict(
        model=MODEL, prompt=TEXT_PROMPTS[0], n=4, max_tokens=40, temperature=1.0, seed=1,
        stop=["e", "a"],
    )  # fmt: skip
    client = server.get_client()
    full = client.completions.create(**kwargs)
    texts, finishes = {i: "" for i in range(4)}, {i: [] for i in range(4)}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finishes[choice.index].append(choice.finish_reason)
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert [finishes[i] for i in range(4)] == [[c.finish_reason] for c in full.choices]
    assert len({len(c.text) for c in full.choices}) > 1  # they did end apart


def test_async_client(server, offline_llm):
    expected = offline_texts(offline_llm, TEXT_PROMPTS, 8)

    async def run() -> list[str]:
        client = server.get_async_client()
        outs = await asyncio.gather(
            *(
                client.completions.create(
                    model=MODEL,
                    prompt=p,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                for p in TEXT_PROMPTS
            )
        )
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == expected


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.get_client().completions.create(model="gpt-4", prompt="hi", max_tokens=2)
