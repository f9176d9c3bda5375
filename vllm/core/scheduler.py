"""Continuous-batching scheduler. Pure Python: no torch, unit-tested alone.

Every step mixes decodes and (chunks of) prefills under one token budget,
``max_num_batched_tokens``. Running sequences go first, in admission order; when
the KV cache runs out the newest running sequence is preempted by recompute (its
blocks are freed and it re-prefills later), which is cheap for short sequences and
needs no swap space. Waiting sequences are admitted strictly FIFO so no request
starves behind later, smaller ones. With prefix caching a sequence is admitted with the
cached blocks of its longest cached prefix and computes only the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vllm.core.block_manager import BlockManager, cdiv
from vllm.engine.metrics_types import SchedulerStats
from vllm.sequence import (
    CachedSeqData,
    ModelRunnerOutput,
    NewSeqData,
    SampledToken,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)

if TYPE_CHECKING:
    from vllm.config import CacheConfig, SchedulerConfig


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        if cache_config.num_gpu_blocks is None:
            raise ValueError(
                "cache_config.num_gpu_blocks is not set; size the KV cache before "
                "building the scheduler."
            )
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        # SchedulerConfig.__post_init__ always fills this in.
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens or 0
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.block_manager = BlockManager(
            cache_config.num_gpu_blocks,
            cache_config.block_size,
            enable_prefix_caching=cache_config.enable_prefix_caching,
        )

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Every unfinished sequence, and the unfinished sequences of each request.
        self.seqs: dict[int, Sequence] = {}
        self.requests: dict[str, dict[int, Sequence]] = {}
        # Sequences the workers must forget, reported with the next schedule().
        self._finished_seq_ids: list[int] = []
        # Preemptions so far (each one recomputes a sequence's KV later), for stats and tests.
        self.num_preemptions = 0

    # ----------------------------------------------------------------- requests

    def add_seq(self, seq: Sequence) -> None:
        """Queue a new sequence. Rejects a prompt that could never fit in the KV cache."""
        bm = self.block_manager
        if cdiv(len(seq), bm.block_size) > bm.num_blocks:
            raise ValueError(
                f"Sequence {seq.seq_id} of request {seq.request_id!r} has {len(seq)} tokens, "
                f"which need {cdiv(len(seq), bm.block_size)} KV cache blocks, but the cache "
                f"holds only {bm.num_blocks} blocks of {bm.block_size} tokens."
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq
        self.requests.setdefault(seq.request_id, {})[seq.seq_id] = seq

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire ``seq`` with a finished ``status`` and release its KV cache blocks."""
        if seq.seq_id not in self.seqs:
            return  # already finished
        # Membership, not status: the caller may have set a finished status already.
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)
        if seq.in_worker:
            self._finished_seq_ids.append(seq.seq_id)
            seq.in_worker = False
        del self.seqs[seq.seq_id]
        group = self.requests[seq.request_id]
        del group[seq.seq_id]
        if not group:
            del self.requests[seq.request_id]

    def abort_request(self, request_id: str) -> None:
        for seq in list(self.requests.get(request_id, {}).values()):
            self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for request_id in request_ids:
            self.abort_request(request_id)

    def get_stats(self) -> SchedulerStats:
        """Requests running and waiting (a request counts once, as running if any of its
        sequences runs) and the fraction of KV cache blocks in use."""
        running = {s.request_id for s in self.running}
        waiting = {s.request_id for s in self.waiting}
        bm = self.block_manager
        return SchedulerStats(
            num_running_reqs=len(running),
            num_waiting_reqs=len(waiting - running),
            kv_cache_usage=1.0 - bm.num_free_blocks / bm.num_blocks,
            prefix_cache_queries=bm.num_queried_tokens,
            prefix_cache_hits=bm.num_hit_tokens,
        )

    def reset_prefix_cache(self) -> int:
        """Drop every cached block that no running sequence uses; return how many."""
        return self.block_manager.reset_prefix_cache()

    def has_unfinished_seqs(self) -> bool:
        return bool(self.seqs)

    def get_num_unfinished_seqs(self) -> int:
        return len(self.seqs)

    # ----------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: running sequences first, then FIFO admissions."""
        budget = self.max_num_batched_tokens
        # (seq, num_new_tokens, block ids allocated this step), in batch order.
        batch: list[tuple[Sequence, int, list[int]]] = []
        preempted: list[int] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0 or (
                num_new < seq.num_uncomputed_tokens and not self.enable_chunked_prefill
            ):
                i += 1  # nothing to run, or a prefill that may not be split: wait a step
                continue
            while not self.block_manager.can_allocate(seq, num_new):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    raise RuntimeError(
                        f"Sequence {seq.seq_id} alone needs more than the whole KV cache "
                        f"({self.block_manager.num_blocks} blocks of "
                        f"{self.block_manager.block_size} tokens); lower max_model_len or "
                        "give the KV cache more memory."
                    )
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                batch.append((seq, num_new, self._allocate(seq, num_new)))
                budget -= num_new
                i += 1

        # Admitting while preempting would only thrash: the cache is already short.
        while (
            not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0
        ):
            seq = self.waiting[0]
            num_new = self._prepare_admission(seq, budget)
            if num_new is None:
                break  # FIFO: nothing jumps the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, num_new, self._allocate(seq, num_new)))
            budget -= num_new

        out = SchedulerOutput(finished_seq_ids=self._finished_seq_ids + preempted)
        self._finished_seq_ids = []
        for seq, num_new, new_block_ids in batch:
            if seq.in_worker:
                out.cached_seqs.append(
                    CachedSeqData(seq.seq_id, seq.pending_token_ids, new_block_ids)
                )
            else:
                out.new_seqs.append(
                    NewSeqData(
                        seq_id=seq.seq_id,
                        token_ids=list(seq.token_ids),
                        num_prompt_tokens=seq.num_prompt_tokens,
                        num_computed_tokens=seq.num_computed_tokens,
                        block_ids=list(seq.block_ids),
                        sampling_params=seq.sampling_params,
                    )
                )
                seq.in_worker = True
            seq.pending_token_ids = []  # sent; the list above now belongs to the output
            out.num_scheduled_tokens[seq.seq_id] = num_new
        return out

    def _allocate(self, seq: Sequence, num_new: int) -> list[int]:
        """Blocks for ``seq``'s next ``num_new`` tokens; the blocks those tokens fill are
        named in the prefix cache now, for lookups from this step on."""
        new_block_ids = self.block_manager.allocate(seq, num_new)
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
        return new_block_ids

    def _prepare_admission(self, seq: Sequence, budget: int) -> int | None:
        """Tokens ``seq`` would run if admitted now, or None if it must keep waiting.

        A sibling (same request) that already computed the prompt lends its full
        prompt blocks, so ``n`` outputs prefill the prompt once. A sibling still
        prefilling it makes ``seq`` wait for that instead of duplicating the work.
        Otherwise the prefix cache lends what it holds of the sequence's tokens, unless
        the request wants prompt logprobs, which need every prompt token computed.
        """
        bm = self.block_manager
        siblings = [
            s
            for s in self.requests[seq.request_id].values()
            if s is not seq and s.status is SequenceStatus.RUNNING
        ]
        if siblings:
            parent = next(
                (s for s in siblings if s.num_computed_tokens >= s.num_prompt_tokens), None
            )
            if parent is None:
                return None
            # Leave at least one prompt token to compute so the child samples its own token.
            bm.fork(parent, seq, seq.num_prompt_tokens - 1)
        elif seq.sampling_params.prompt_logprobs is None:
            bm.share_prefix(seq, bm.find_cached_prefix(seq))

        num_new = min(seq.num_uncomputed_tokens, budget)
        fits_budget = num_new == seq.num_uncomputed_tokens or self.enable_chunked_prefill
        if not fits_budget or not bm.can_allocate(seq, num_new):
            bm.free(seq)  # undo the sharing
            seq.num_computed_tokens = 0
            return None
        if bm.enable_prefix_caching:
            bm.record_lookup(len(seq), seq.num_computed_tokens)
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the KV, requeue at the front to re-prefill first."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.in_worker = False
        seq.pending_token_ids = []  # already in token_ids; resent whole as a new sequence
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ results

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[tuple[Sequence, SampledToken]]:
        """Advance computed counts and append sampled tokens; return them for output processing.

        Sequences finished or preempted since the step was scheduled are skipped.
        """
        for seq_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            seq = self.seqs.get(seq_id)
            if seq is not None and seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens += num_tokens
        results: list[tuple[Sequence, SampledToken]] = []
        for sampled in runner_output.sampled:
            seq = self.seqs.get(sampled.seq_id)
            if seq is not None and seq.status is SequenceStatus.RUNNING:
                seq.append_token(sampled.token_id)
                results.append((seq, sampled))
        return results
