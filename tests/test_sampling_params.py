"""SamplingParams: upstream defaults, normalisation, and the errors users see."""

import pytest

from vllm.sampling_params import SamplingParams, SamplingType

UPSTREAM_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "detokenize": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
}


def test_defaults_match_upstream() -> None:
    params = SamplingParams()
    for name, value in UPSTREAM_DEFAULTS.items():
        assert getattr(params, name) == value, name
    assert params.sampling_type == SamplingType.RANDOM


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("presence_penalty", -2.5),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -3.0),
        ("frequency_penalty", "high"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", "0.7"),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("top_k", 5.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("seed", "42"),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 2.0),
        ("prompt_logprobs", -1),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", 7),
        ("stop", [""]),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop", 3),
    ],
)
def test_invalid_value_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_names_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"temperature must be non-negative, got -1\.0\."):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1\.5\."):
        SamplingParams(top_p=1.5)


def test_min_tokens_above_max_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens.*max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(min_tokens=100, max_tokens=None).max_tokens is None


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(2, 3)).stop_token_ids == [2, 3]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=40).top_k == 40


@pytest.mark.parametrize("temperature", [0.0, 0, 1e-6])
def test_greedy_resets_truncation(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=10, min_p=0.2, seed=1)
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)
    assert params.sampling_type == SamplingType.GREEDY


def test_greedy_allows_n_above_one() -> None:
    assert SamplingParams(n=4, temperature=0.0).n == 4


def test_sampling_type_random_and_seeded() -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.1)
    assert (params.top_p, params.top_k, params.min_p) == (0.9, 20, 0.1)
    assert params.sampling_type == SamplingType.RANDOM
    assert SamplingParams(temperature=0.8, seed=0).sampling_type == SamplingType.RANDOM_SEED


def test_clone_is_deep() -> None:
    params = SamplingParams(stop=["x"], stop_token_ids=[1])
    copy = params.clone()
    assert copy == params
    copy.stop.append("y")
    copy.stop_token_ids.append(2)
    assert params.stop == ["x"] and params.stop_token_ids == [1]
