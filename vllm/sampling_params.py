"""Per-request sampling parameters, with upstream vLLM's names and defaults."""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any

# Below this temperature sampling is greedy (upstream's _SAMPLING_EPS).
_SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What each ``RequestOutput`` of a request carries, as upstream vLLM."""

    # All tokens and text so far, every step.
    CUMULATIVE = 0
    # Only the tokens and text new since the request's last output, every step.
    DELTA = 1
    # One output, when the request finishes (``LLM.generate``).
    FINAL_ONLY = 2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _int(name: str, value: Any) -> int:
    # bool is an int subclass; `n=True` is a bug in the caller, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)


def _list(name: str, value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list (or None), got {value!r}.")
    return list(value)


@dataclass
class SamplingParams:
    """How to sample the output tokens of one request.

    Names, defaults and meanings follow upstream vLLM so existing scripts run
    unchanged. Values are validated and normalised on construction: ``stop``
    and ``stop_token_ids`` become lists, ``top_k=-1`` becomes 0 (disabled), and
    a temperature below 1e-5 means greedy, which resets ``top_p``, ``top_k``
    and ``min_p`` to their disabled values. ``logprobs`` is the number of top
    log-probabilities returned besides the sampled token's. ``max_tokens=None``
    means generate up to the model's context length.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Token ids that end generation: stop_token_ids plus the model's EOS unless ignore_eos.
    # Set by the engine through update_from_generation_config.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._normalise()
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the truncation knobs cannot change the argmax.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0

    def _normalise(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _list("stop", self.stop)
        self.stop_token_ids = _list("stop_token_ids", self.stop_token_ids)
        self.all_stop_token_ids = set(self.stop_token_ids)
        if _int("top_k", self.top_k) == -1:
            self.top_k = 0

    def _verify(self) -> None:
        if _int("n", self.n) < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        if not _float("repetition_penalty", self.repetition_penalty) > 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if _float("temperature", self.temperature) < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < _float("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disable) or at least 0, got {self.top_k}.")
        if not 0.0 <= _float("min_p", self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not -(2**63) <= _int("seed", self.seed) <= 2**64 - self.n:
            # Sample i of n uses seed + i, a 64-bit generator seed.
            raise ValueError(f"seed must be in [-2**63, 2**64 - n] (n={self.n}), got {self.seed}.")
        if self.max_tokens is not None and _int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1 (or None), got {self.max_tokens}.")
        if _int("min_tokens", self.min_tokens) < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and _int(name, value) < 0:
                raise ValueError(f"{name} must be non-negative (or None), got {value}.")
        for token_id in self.stop_token_ids:
            _int("stop_token_ids", token_id)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}.")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None
    ) -> None:
        """Fold the model's EOS id(s) into the stop set, as upstream does."""
        stop_ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            eos = generation_config.get("eos_token_id")
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            if model_eos_token_id is not None:
                eos_ids.add(model_eos_token_id)
            stop_ids |= eos_ids
        self.all_stop_token_ids = stop_ids

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
