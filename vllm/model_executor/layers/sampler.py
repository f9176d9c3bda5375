"""Batched sampling: penalties, temperature, min-p, top-k/top-p, seeded generators.

Logprobs (and the cumulative logprob) are those of the model's raw distribution,
before penalties and temperature, as upstream vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops

_SAMPLING_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """Per sampled row settings, as tensors (``None`` when no row needs the feature)."""

    all_greedy: bool
    temperature: torch.Tensor  # [S] (1.0 for greedy rows, unused there)
    greedy_mask: torch.Tensor  # [S] bool
    top_p: torch.Tensor | None
    top_k: torch.Tensor | None
    min_p: torch.Tensor | None
    generators: dict[int, torch.Generator]  # row -> generator for seeded rows
    # Penalties: token counts of outputs [S, V] and prompt presence [S, V].
    output_counts: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    # (row, token_ids) that may not be sampled yet (min_tokens).
    banned_tokens: list[tuple[int, list[int]]]
    max_num_logprobs: int  # 0: only the sampled token's logprob
    need_ranks: bool = False  # a row asked for logprobs: report the sampled token's rank


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    logprobs: torch.Tensor  # [S] logprob of each sampled token
    top_token_ids: torch.Tensor | None  # [S, K]
    top_logprobs: torch.Tensor | None  # [S, K]
    ranks: torch.Tensor | None = None  # [S] 1-based rank of each sampled token, if asked


def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    if md.repetition_penalty is not None:
        seen = md.prompt_mask | (md.output_counts > 0)
        rp = md.repetition_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalty is not None:
        logits = logits - md.frequency_penalty[:, None] * md.output_counts
    if md.presence_penalty is not None:
        logits = logits - md.presence_penalty[:, None] * (md.output_counts > 0)
    return logits


def _top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = top_k.clamp(min=1, max=logits.shape[-1])
        kth = sorted_logits.gather(-1, (logits.shape[-1] - k)[:, None].long())
        # top_k == 0 means disabled.
        cutoff = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < cutoff, -float("inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - top_p[:, None])
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / q), q ~ Exp(1) (one generator per seeded row)."""
    q = torch.empty_like(probs)
    q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return _argmax(probs.div(q))


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: [S, V] float32 over the real vocabulary."""
        # With the C kernel, one pass gives each row's argmax and logsumexp: the sampled
        # tokens' logprobs need no [S, V] log_softmax unless top logprobs are asked for.
        fast = (
            md.max_num_logprobs == 0
            and ops.use_cpu_kernels(logits)
            and logits.dtype == torch.float32
            and logits.dim() == 2
        )
        raw = logits
        if fast:
            raw_greedy, raw_max, raw_log_sum = ops.argmax_logsumexp(logits)
        else:
            raw_logprobs = logits.log_softmax(dim=-1)
        if md.output_counts is not None:
            logits = _apply_penalties(logits, md)
        if md.banned_tokens:
            logits = logits.clone() if logits is raw else logits
            for row, tokens in md.banned_tokens:
                logits[row, tokens] = -float("inf")
        if fast and logits is raw:
            greedy = raw_greedy
        else:
            greedy = _argmax(logits)
        if md.all_greedy:
            token_ids = greedy
        else:
            logits = logits / md.temperature[:, None]
            if md.min_p is not None:
                probs = logits.softmax(dim=-1)
                threshold = md.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
                logits = logits.masked_fill(probs < threshold, -float("inf"))
            if md.top_k is not None or md.top_p is not None:
                logits = _top_k_top_p(logits, md.top_k, md.top_p)
            sampled = _random_sample(logits.softmax(dim=-1), md.generators)
            token_ids = torch.where(md.greedy_mask, greedy, sampled)
        top_ids = top_lp = None
        if fast:
            logprobs = (raw.gather(-1, token_ids[:, None]).squeeze(-1) - raw_max) - raw_log_sum
        else:
            logprobs = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
            if md.max_num_logprobs > 0:
                top_lp, top_ids = raw_logprobs.topk(md.max_num_logprobs, dim=-1)
        ranks = token_ranks(raw, token_ids) if md.need_ranks else None
        return SamplerOutput(token_ids, logprobs, top_ids, top_lp, ranks)


def token_ranks(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``token_ids`` in each row of ``logits`` (or of their log-softmax,
    which orders the same): one more than the number of tokens scored strictly higher."""
    chosen = logits.gather(-1, token_ids[:, None])
    return (logits > chosen).sum(dim=-1) + 1


@dataclass
class PromptLogprobsOutput:
    """Scores of prompt tokens given the tokens before them: row i is one position."""

    logprobs: torch.Tensor  # [P] logprob of the prompt token that follows
    ranks: torch.Tensor  # [P]
    top_token_ids: torch.Tensor | None  # [P, K]
    top_logprobs: torch.Tensor | None  # [P, K]


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_top: int
) -> PromptLogprobsOutput:
    """``logits``: [P, V] float32 at prompt positions; ``next_token_ids``: [P] the prompt
    token after each position. Like the sampled tokens' logprobs, these are of the raw
    distribution (no penalties or temperature), as upstream reports them."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, next_token_ids[:, None]).squeeze(-1)
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_lp = top_ids = None
    if num_top > 0:
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    return PromptLogprobsOutput(chosen, ranks, top_ids, top_lp)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim; the C kernel is ~10x faster on the CPU."""
    if ops.use_cpu_kernels(x) and x.dtype == torch.float32 and x.dim() == 2:
        return ops.argmax(x)
    return x.argmax(dim=-1)
