"""Scheduler: continuous batching, chunked prefill, preemption, n > 1 forking, abort.

Pure Python: configs are stand-ins with the fields the scheduler reads, and a
``FakeWorker`` plays the model runner. It keeps its own copy of every sequence from
``NewSeqData``/``CachedSeqData`` deltas and a fake paged KV cache, so the tests check
what real workers depend on: their view matches the scheduler's, and every token
reads back the KV it (and only it) wrote, even with shared and recycled blocks.
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm.core.scheduler import Scheduler
from vllm.sequence import (
    ModelRunnerOutput,
    SampledToken,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)


def make_seq(
    seq_id: int, prompt_len: int, request_id: str | None = None, index: int = 0
) -> Sequence:
    """Siblings (same request_id) get the same prompt; other requests get distinct ones."""
    request_id = request_id or f"req-{seq_id}"
    first = 1000 + sum(map(ord, request_id)) * 37 % 5000
    return Sequence(
        seq_id,
        request_id,
        [first + i for i in range(prompt_len)],
        SimpleNamespace(logprobs=None, prompt_logprobs=None),
        index=index,
    )


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = False,
) -> Scheduler:
    scheduler_config = SimpleNamespace(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    cache_config = SimpleNamespace(
        num_gpu_blocks=num_blocks,
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
    )
    return Scheduler(scheduler_config, cache_config)


def next_token(seq_id: int, length: int) -> int:
    """Deterministic 'model': the sampled token depends only on the sequence and position."""
    return (seq_id * 31 + length * 7) % 997


class FakeWorker:
    """Mirrors worker-side state from scheduler deltas and checks the paged KV cache."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seqs: dict[int, dict] = {}
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}  # slot -> (seq's token, position)
        self.num_computed_tokens = 0  # tokens run through the "model", over all steps

    def execute(self, out: SchedulerOutput, sched: Scheduler) -> ModelRunnerOutput:
        for seq_id in out.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in out.new_seqs:
            assert new.seq_id not in self.seqs, "new data for a sequence the worker holds"
            self.seqs[new.seq_id] = {
                "tokens": list(new.token_ids),
                "blocks": list(new.block_ids),
                "computed": new.num_computed_tokens,
            }
        for cached in out.cached_seqs:
            state = self.seqs[cached.seq_id]
            state["tokens"] += cached.new_token_ids
            state["blocks"] += cached.new_block_ids
        written: dict[tuple[int, int], int] = {}
        # As the attention backend: every new token's KV is written, then attention reads.
        for seq_id, n in out.num_scheduled_tokens.items():
            state, seq = self.seqs[seq_id], sched.seqs[seq_id]
            assert state["tokens"] == seq.token_ids
            assert state["blocks"] == seq.block_ids
            assert state["computed"] == seq.num_computed_tokens
            start, end = state["computed"], state["computed"] + n
            assert 0 < n and end <= len(state["tokens"])
            assert len(state["blocks"]) * self.block_size >= end
            for pos in range(start, end):
                slot = self._slot(state, pos)
                # Only this step's own tokens may overwrite a slot another sequence reads.
                assert slot not in written or written[slot] == seq_id, "shared slot rewritten"
                written[slot] = seq_id
                self.kv[slot] = (state["tokens"][pos], pos)
        sampled = []
        for seq_id, n in out.num_scheduled_tokens.items():
            state = self.seqs[seq_id]
            end = state["computed"] + n
            # Attention reads every earlier position: it must find this sequence's tokens.
            for pos in range(end):
                assert self.kv[self._slot(state, pos)] == (state["tokens"][pos], pos)
            state["computed"] = end
            self.num_computed_tokens += n
            if end == len(state["tokens"]):
                sampled.append(SampledToken(seq_id, next_token(seq_id, end), logprob=-0.5))
        return ModelRunnerOutput(sampled)

    def _slot(self, state: dict, pos: int) -> tuple[int, int]:
        return state["blocks"][pos // self.block_size], pos % self.block_size


def check_block_ownership(sched: Scheduler) -> None:
    """Every block is free xor referenced exactly by the running sequences that hold it."""
    bm = sched.block_manager
    holders = [0] * bm.num_blocks
    for seq in sched.running:
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        for block_id in seq.block_ids:
            holders[block_id] += 1
    for seq in sched.waiting:
        assert seq.block_ids == [] and seq.num_computed_tokens == 0
    assert holders == bm.ref_counts
    free = list(bm.free_block_ids) + list(bm.evictable)
    assert len(set(free)) == len(free)
    # Cached (named) blocks: the name table and the blocks agree; only named ones wait
    # for eviction.
    for block_id, name in enumerate(bm.block_hashes):
        if name is not None:
            assert bm.cached_blocks[name] == block_id
    assert len(bm.cached_blocks) == sum(h is not None for h in bm.block_hashes)
    assert all(bm.block_hashes[b] is not None for b in bm.evictable)
    assert all(holders[b] == 0 for b in free)
    assert len(free) + sum(1 for h in holders if h) == bm.num_blocks


def step(
    sched: Scheduler, worker: FakeWorker, max_tokens: dict[int, int] | None = None
) -> tuple[SchedulerOutput, list[tuple[Sequence, SampledToken]]]:
    """One engine step; sequences reaching ``max_tokens`` outputs are finished."""
    out = sched.schedule()
    check_block_ownership(sched)
    results = sched.update_from_output(out, worker.execute(out, sched))
    for seq, _ in results:
        if max_tokens is not None and seq.num_output_tokens >= max_tokens[seq.seq_id]:
            sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)
    return out, results


def expected_output(seq: Sequence, num_outputs: int) -> list[int]:
    tokens = list(seq.prompt_token_ids)
    for _ in range(num_outputs):
        tokens.append(next_token(seq.seq_id, len(tokens)))
    return tokens[seq.num_prompt_tokens :]


def test_scheduler_and_block_manager_do_not_import_torch() -> None:
    code = (
        "import sys; import vllm.core.scheduler, vllm.core.block_manager; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admits_up_to_max_num_seqs() -> None:
    sched = make_scheduler(max_num_seqs=3)
    for i in range(5):
        sched.add_seq(make_seq(i, 4))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == [0, 1, 2]
    assert [s.seq_id for s in sched.running] == [0, 1, 2]
    assert [s.seq_id for s in sched.waiting] == [3, 4]
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
    assert sched.get_num_unfinished_seqs() == 5 and sched.has_unfinished_seqs()


def test_chunked_prefill_respects_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    worker = FakeWorker(block_size=4)
    seq = make_seq(0, 10)
    sched.add_seq(seq)
    chunks, sampled_at = [], []
    for i in range(3):
        out, results = step(sched, worker)
        assert out.total_num_scheduled_tokens <= 4
        chunks.append(out.num_scheduled_tokens[0])
        if results:
            sampled_at.append(i)
    assert chunks == [4, 4, 2]
    assert sampled_at == [2]  # only the chunk that reaches the end of the prompt samples
    assert seq.num_computed_tokens == 10 and seq.num_output_tokens == 1

    # A decode runs first and a new prompt is chunked into what is left of the budget.
    other = make_seq(1, 6)
    sched.add_seq(other)
    out, _ = step(sched, worker)
    assert out.num_scheduled_tokens == {0: 1, 1: 3}
    out, _ = step(sched, worker)
    assert out.num_scheduled_tokens == {0: 1, 1: 3}
    assert other.num_output_tokens == 1


def test_without_chunked_prefill_prompts_are_never_split() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add_seq(make_seq(0, 5))
    sched.add_seq(make_seq(1, 5))
    sched.add_seq(make_seq(2, 2))  # would fit, but FIFO: no skipping seq 1
    out = sched.schedule()
    assert out.num_scheduled_tokens == {0: 5}
    assert [s.seq_id for s in sched.waiting] == [1, 2]


def test_fifo_stops_at_first_sequence_without_blocks() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add_seq(make_seq(0, 8))
    sched.add_seq(make_seq(1, 12))  # needs 3 blocks, only 2 left
    sched.add_seq(make_seq(2, 4))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {0: 8}
    assert [s.seq_id for s in sched.waiting] == [1, 2]


def test_new_and_cached_seq_data_contents() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=6)
    worker = FakeWorker(block_size=4)
    seq = make_seq(0, 5)
    sched.add_seq(seq)

    out = sched.schedule()
    assert out.cached_seqs == [] and len(out.new_seqs) == 1
    new = out.new_seqs[0]
    assert new.seq_id == 0 and new.token_ids == seq.token_ids
    assert new.token_ids is not seq.token_ids and new.block_ids is not seq.block_ids
    assert new.num_prompt_tokens == 5 and new.num_computed_tokens == 0
    assert new.block_ids == seq.block_ids and len(new.block_ids) == 2
    assert new.sampling_params is seq.sampling_params
    assert seq.in_worker
    results = sched.update_from_output(out, worker.execute(out, sched))
    ((got_seq, sampled),) = results
    assert got_seq is seq and sampled.token_id == seq.token_ids[-1]
    assert seq.pending_token_ids == [sampled.token_id]

    out = sched.schedule()
    assert out.new_seqs == []
    (cached,) = out.cached_seqs
    assert cached.seq_id == 0 and cached.new_token_ids == [sampled.token_id]
    assert cached.new_block_ids == []  # position 5 still fits in block 1
    sched.update_from_output(out, worker.execute(out, sched))
    for _ in range(2):  # positions 6 and 7 fill block 1
        step(sched, worker)
    out = sched.schedule()  # position 8 starts a new block: only its id is sent
    (cached,) = out.cached_seqs
    assert len(cached.new_block_ids) == 1 and seq.block_ids[-1] == cached.new_block_ids[0]
    assert len(seq.block_ids) == 3


def test_preemption_requeues_at_front_and_later_completes() -> None:
    # 4 blocks of 2 tokens; two prompts of 4 tokens fill them, so the first decode
    # (position 4 needs a third block) must evict the newest running sequence.
    sched = make_scheduler(num_blocks=4, block_size=2)
    worker = FakeWorker(block_size=2)
    a, b, c = make_seq(0, 4), make_seq(1, 4), make_seq(2, 2)
    for seq in (a, b, c):
        sched.add_seq(seq)
    max_tokens = {0: 3, 1: 3, 2: 1}

    out, _ = step(sched, worker, max_tokens)
    assert out.num_scheduled_tokens == {0: 4, 1: 4}  # c finds no free block
    out, _ = step(sched, worker, max_tokens)
    assert out.num_scheduled_tokens == {0: 1}
    assert out.finished_seq_ids == [1]
    assert [s.seq_id for s in sched.waiting] == [1, 2]  # front of the queue, ahead of c
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_ids == [] and not b.in_worker and b.num_preemptions == 1
    assert b.num_output_tokens == 1  # its sampled token is kept and recomputed

    resent = []
    for _ in range(50):
        if not sched.has_unfinished_seqs():
            break
        out, _ = step(sched, worker, max_tokens)
        resent += [new for new in out.new_seqs if new.seq_id == 1]
    assert not sched.has_unfinished_seqs()
    (new,) = resent
    assert new.token_ids == b.token_ids[:5] and new.num_computed_tokens == 0
    for seq in (a, b, c):
        assert seq.output_token_ids == expected_output(seq, max_tokens[seq.seq_id])
    assert sched.block_manager.num_free_blocks == 4


def test_running_sequence_preempts_itself_when_it_is_last() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=3)
    worker = FakeWorker(block_size=2)
    a, b = make_seq(0, 4), make_seq(1, 4)
    sched.add_seq(a)
    sched.add_seq(b)
    step(sched, worker)  # a: 3 tokens (2 blocks)
    step(sched, worker)  # a: 1 token, b: 2 tokens (1 block) -> 3 blocks used
    assert a.num_output_tokens == 1 and b.num_computed_tokens == 2
    # a decodes at position 4 (new block, the last free one); b needs 1 more: none left.
    out, _ = step(sched, worker)
    assert out.num_scheduled_tokens == {0: 1}
    assert out.finished_seq_ids == [1] and sched.waiting[0] is b


def test_preempting_alone_raises_instead_of_looping() -> None:
    sched = make_scheduler(num_blocks=2, block_size=2)
    worker = FakeWorker(block_size=2)
    sched.add_seq(make_seq(0, 4))
    step(sched, worker)
    with pytest.raises(RuntimeError, match="alone needs more than the whole KV cache"):
        sched.schedule()


@pytest.mark.parametrize("chunked", [True, False])
def test_simulated_run_with_tiny_cache_finishes_every_sequence(chunked: bool) -> None:
    block_size = 4
    # Without chunking the budget must hold the longest sequence (16 + 12 tokens) so a
    # preempted one can re-prefill whole; the engine's config enforces the same.
    budget = 16 if chunked else 32
    sched = make_scheduler(
        num_blocks=12,
        block_size=block_size,
        max_num_seqs=5,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
    )
    worker = FakeWorker(block_size=block_size)
    seqs, max_tokens = [], {}
    seq_id = 0
    for r in range(12):
        n = 1 + r % 3
        for index in range(n):
            seq = make_seq(seq_id, prompt_len=3 + (r * 5) % 14, request_id=f"r{r}", index=index)
            seqs.append(seq)
            max_tokens[seq_id] = 1 + (r * 7 + index) % 12
            sched.add_seq(seq)
            seq_id += 1

    num_steps = num_forked = 0
    while sched.has_unfinished_seqs():
        num_steps += 1
        assert num_steps < 2000, "scheduler made no progress"
        out, _ = step(sched, worker, max_tokens)
        num_forked += sum(1 for new in out.new_seqs if new.num_computed_tokens > 0)
        assert out.total_num_scheduled_tokens <= budget
        assert len(out.num_scheduled_tokens) <= 5
        assert not set(out.finished_seq_ids) & set(out.num_scheduled_tokens)

    assert sum(s.num_preemptions for s in seqs) > 0, "the cache was meant to run out"
    assert num_forked > 0, "n > 1 requests were meant to share prompt blocks"
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED_LENGTH_CAPPED
        assert seq.output_token_ids == expected_output(seq, max_tokens[seq.seq_id])
        assert seq.block_ids == []
    bm = sched.block_manager
    assert bm.num_free_blocks == 12 and bm.ref_counts == [0] * 12
    assert sched.running == [] and not sched.waiting and not sched.requests


def test_n_greater_than_one_forks_the_prompt_once() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4)
    worker = FakeWorker(block_size=4)
    siblings = [make_seq(i, 10, request_id="req", index=i) for i in range(3)]
    later = make_seq(3, 4)
    for seq in [*siblings, later]:
        sched.add_seq(seq)

    # Only the first sibling prefills; the others (and everything behind them) wait.
    out, _ = step(sched, worker)
    assert out.num_scheduled_tokens == {0: 10}
    assert [s.seq_id for s in sched.waiting] == [1, 2, 3]

    # Now the siblings fork: two full blocks shared, one prompt token left to compute.
    out, _ = step(sched, worker)
    assert out.num_scheduled_tokens == {0: 1, 1: 2, 2: 2, 3: 4}
    parent = siblings[0]
    for child in siblings[1:]:
        (new,) = [n for n in out.new_seqs if n.seq_id == child.seq_id]
        assert new.num_computed_tokens == 8
        assert new.block_ids[:2] == parent.block_ids[:2]
        assert new.block_ids[2] != parent.block_ids[2]
    assert [sched.block_manager.ref_counts[b] for b in parent.block_ids[:2]] == [3, 3]
    assert [s.num_output_tokens for s in siblings] == [2, 1, 1]
    assert len({s.output_token_ids[0] for s in siblings}) == 3  # each sampled its own

    # Finishing the parent first leaves the shared blocks with the children.
    sched.finish_seq(parent, SequenceStatus.FINISHED_STOPPED)
    assert [sched.block_manager.ref_counts[b] for b in siblings[1].block_ids[:2]] == [2, 2]
    max_tokens = {1: 3, 2: 5, 3: 2}
    while sched.has_unfinished_seqs():
        step(sched, worker, max_tokens)
    for seq in siblings[1:]:
        assert seq.output_token_ids == expected_output(seq, max_tokens[seq.seq_id])
    assert sched.block_manager.num_free_blocks == 16


def test_abort_frees_blocks_and_is_reported_to_workers() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    worker = FakeWorker(block_size=4)
    a = make_seq(0, 6, request_id="a")
    b1, b2 = make_seq(1, 3, request_id="b"), make_seq(2, 3, request_id="b", index=1)
    c = make_seq(3, 3, request_id="c")
    for seq in (a, b1, b2, c):
        sched.add_seq(seq)
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == [0, 1]
    assert sched.block_manager.num_free_blocks == 5
    runner_output = worker.execute(out, sched)

    sched.abort_requests(["a", "b"])  # a and b1 running, b2 still waiting
    for seq in (a, b1, b2):
        assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.block_ids == []
    assert sched.block_manager.num_free_blocks == 8
    assert sched.get_num_unfinished_seqs() == 1

    # The step that was in flight comes back: aborted sequences are skipped.
    results = sched.update_from_output(out, runner_output)
    assert results == [] and a.num_computed_tokens == 0 and len(a) == 6

    out = sched.schedule()
    assert out.finished_seq_ids == [0, 1]  # b2 never reached a worker
    assert list(out.num_scheduled_tokens) == [3]
    sched.abort_request("c")
    sched.abort_request("c")  # unknown by now: no-op
    assert sched.schedule().finished_seq_ids == [3]
    assert not sched.has_unfinished_seqs() and sched.block_manager.num_free_blocks == 8


def test_add_seq_rejects_prompt_larger_than_cache() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="need 3 KV cache blocks, but the cache holds only 2"):
        sched.add_seq(make_seq(0, 9))


def test_requires_sized_kv_cache() -> None:
    scheduler_config = SimpleNamespace(
        max_num_seqs=1, max_num_batched_tokens=8, enable_chunked_prefill=True
    )
    with pytest.raises(ValueError, match="num_gpu_blocks is not set"):
        Scheduler(scheduler_config, SimpleNamespace(num_gpu_blocks=None, block_size=16))


def test_accepts_real_config_objects() -> None:
    pytest.importorskip("torch")
    from vllm.config import CacheConfig, SchedulerConfig

    cache_config = CacheConfig(block_size=16, num_gpu_blocks_override=None)
    cache_config.num_gpu_blocks = 10
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), cache_config)
    sched.add_seq(make_seq(0, 20))
    assert sched.schedule().num_scheduled_tokens == {0: 20}


# ------------------------------------------------------------------ prefix caching


def seq_with_prompt(seq_id: int, prompt: list[int], prompt_logprobs: int | None = None):
    params = SimpleNamespace(logprobs=None, prompt_logprobs=prompt_logprobs)
    return Sequence(seq_id, f"req-{seq_id}", prompt, params)


def run_to_completion(sched, worker, seqs, max_tokens) -> int:
    for seq in seqs:
        sched.add_seq(seq)
    num_steps = 0
    while sched.has_unfinished_seqs():
        num_steps += 1
        assert num_steps < 2000, "scheduler made no progress"
        step(sched, worker, max_tokens)
    return num_steps


@pytest.mark.parametrize("chunked", [True, False])
def test_shared_prefixes_with_tiny_cache_give_the_same_outputs_for_less_work(
    chunked: bool,
) -> None:
    """Requests share a system prompt and some repeat whole prompts; the cache is small
    enough that sequences are preempted and cached blocks evicted. Every output must be
    what the 'model' gives, and caching must save computed tokens."""
    system = [7000 + i for i in range(9)]
    computed, preemptions = {}, {}
    for caching in (False, True):
        sched = make_scheduler(
            num_blocks=14,
            block_size=4,
            max_num_seqs=4,
            max_num_batched_tokens=16 if chunked else 32,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=caching,
        )
        worker = FakeWorker(block_size=4)
        seqs, max_tokens = [], {}
        for i in range(14):
            tail = [100 * (i % 5) + j for j in range(1 + i % 6)]
            seqs.append(seq_with_prompt(i, system + tail))
            max_tokens[i] = 1 + (i * 5) % 9
        run_to_completion(sched, worker, seqs, max_tokens)
        for seq in seqs:
            assert seq.output_token_ids == expected_output(seq, max_tokens[seq.seq_id])
        assert sched.block_manager.ref_counts == [0] * 14
        computed[caching] = worker.num_computed_tokens
        preemptions[caching] = sched.num_preemptions
        stats = sched.get_stats()
        if caching:
            assert stats.prefix_cache_hits > 0
            assert stats.prefix_cache_queries >= sum(len(s.prompt_token_ids) for s in seqs)
        else:
            assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
    assert preemptions[False] > 0, "the cache was meant to run out"
    assert computed[True] < computed[False]


def test_identical_prompts_in_one_step_compute_the_prefix_once() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, enable_prefix_caching=True)
    worker = FakeWorker(block_size=4)
    prompt = list(range(500, 510))
    a, b = seq_with_prompt(0, prompt), seq_with_prompt(1, prompt)
    sched.add_seq(a)
    sched.add_seq(b)
    out, _ = step(sched, worker)
    # b is admitted in the same step with a's two full blocks, named when a was
    # scheduled: the backend writes a's KV before any attention reads it.
    assert out.num_scheduled_tokens == {0: 10, 1: 2}
    (new_b,) = [n for n in out.new_seqs if n.seq_id == 1]
    assert new_b.num_computed_tokens == 8 and new_b.block_ids[:2] == a.block_ids[:2]
    assert sched.get_stats().prefix_cache_hits == 8


def test_finished_request_prefix_is_reused_and_reported() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, enable_prefix_caching=True)
    worker = FakeWorker(block_size=4)
    first = seq_with_prompt(0, list(range(300, 311)))
    run_to_completion(sched, worker, [first], {0: 6})
    # The next prompt is the first one's prompt and output (a chat's next turn) and more.
    follow_up = seq_with_prompt(1, list(first.token_ids) + [1, 2, 3])
    sched.add_seq(follow_up)
    out, _ = step(sched, worker)
    (new,) = out.new_seqs
    # first computed 16 of its 17 tokens (its last output was sampled, never run): 4 blocks.
    assert new.num_computed_tokens == 16
    assert out.num_scheduled_tokens == {1: 20 - 16}


def test_prompt_logprobs_requests_compute_their_whole_prompt() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, enable_prefix_caching=True)
    worker = FakeWorker(block_size=4)
    prompt = list(range(400, 409))
    run_to_completion(sched, worker, [seq_with_prompt(0, prompt)], {0: 1})
    scored = seq_with_prompt(1, prompt, prompt_logprobs=0)
    sched.add_seq(scored)
    out, _ = step(sched, worker)
    assert out.new_seqs[0].num_computed_tokens == 0
    assert out.num_scheduled_tokens == {1: 9}


def test_preempted_sequence_resumes_from_its_cached_blocks() -> None:
    sched = make_scheduler(
        num_blocks=6, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=True
    )
    worker = FakeWorker(block_size=4)
    a, b = seq_with_prompt(0, list(range(10))), seq_with_prompt(1, list(range(50, 62)))
    sched.add_seq(a)
    sched.add_seq(b)
    step(sched, worker)  # a: 3 blocks, b: 3 blocks; the cache is full
    out, _ = step(sched, worker)  # b's decode needs a 4th block: b, the newest, is preempted
    assert 1 in out.finished_seq_ids and sched.waiting[0] is b
    sched.finish_seq(a, SequenceStatus.FINISHED_STOPPED)
    out, _ = step(sched, worker)
    (new,) = out.new_seqs
    # b's three full prompt blocks were cached: only its sampled token runs again.
    assert new.seq_id == 1 and len(new.token_ids) == 13 and new.num_computed_tokens == 12
    assert out.num_scheduled_tokens == {1: 1}


def test_reset_prefix_cache_drops_unused_blocks() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, enable_prefix_caching=True)
    worker = FakeWorker(block_size=4)
    prompt = list(range(600, 609))
    run_to_completion(sched, worker, [seq_with_prompt(0, prompt)], {0: 1})
    assert sched.reset_prefix_cache() == 2
    sched.add_seq(seq_with_prompt(1, prompt))
    out, _ = step(sched, worker)
    assert out.new_seqs[0].num_computed_tokens == 0
