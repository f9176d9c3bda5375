"""BlockManager: allocation, reference counts, fork and exhaustion (pure Python, no torch)."""

from types import SimpleNamespace

import pytest

from vllm.core.block_manager import BlockManager, hash_block_tokens
from vllm.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int, request_id: str | None = None) -> Sequence:
    return Sequence(
        seq_id,
        request_id or f"req-{seq_id}",
        list(range(100, 100 + num_tokens)),
        SimpleNamespace(logprobs=None, prompt_logprobs=None),
    )


def test_allocate_covers_computed_plus_new_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, 10)
    assert bm.num_required_blocks(seq, 10) == 3
    new = bm.allocate(seq, 10)
    assert new == seq.block_ids and len(new) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.ref_counts[b] == 1 for b in new)

    # After the prefill ran, decodes only need a block when they cross a boundary.
    seq.num_computed_tokens = 10
    assert bm.num_required_blocks(seq, 1) == 0
    assert bm.allocate(seq, 2) == []
    seq.num_computed_tokens = 12
    assert bm.num_required_blocks(seq, 1) == 1
    assert len(bm.allocate(seq, 1)) == 1
    assert len(seq.block_ids) == 4 and bm.num_free_blocks == 4


def test_free_returns_blocks_and_double_free_is_noop() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(0, 3), make_seq(1, 4)
    bm.allocate(a, 3)
    bm.allocate(b, 4)
    assert bm.num_free_blocks == 0
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 2
    bm.free(a)  # already freed: nothing changes
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == 4
    assert sorted(bm.free_block_ids) == [0, 1, 2, 3]
    assert bm.ref_counts == [0, 0, 0, 0]


def test_freed_blocks_are_reused_before_untouched_ones() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    a = make_seq(0, 6)
    first = bm.allocate(a, 6)
    bm.free(a)
    b = make_seq(1, 6)
    assert bm.allocate(b, 6) == first  # the same blocks, in the same order
    c = make_seq(2, 2)
    assert bm.allocate(c, 2) == [3]  # then the pool's next untouched block


def test_exhaustion_raises_without_changing_state() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(0, 8), make_seq(1, 8)
    bm.allocate(a, 8)
    assert not bm.can_allocate(b, 8)
    assert bm.can_allocate(b, 4)
    with pytest.raises(RuntimeError, match="needs 2 more KV cache blocks but only 1"):
        bm.allocate(b, 8)
    assert b.block_ids == [] and bm.num_free_blocks == 1


def test_fork_shares_full_computed_blocks_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = make_seq(0, 10, "r"), make_seq(1, 10, "r")
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    # 9 tokens -> two full blocks (8 tokens); the partial third block stays private.
    assert bm.fork(parent, child, 9) == 8
    assert child.block_ids == parent.block_ids[:2]
    assert child.block_ids is not parent.block_ids
    assert child.num_computed_tokens == 8
    assert [bm.ref_counts[b] for b in parent.block_ids] == [2, 2, 1]
    assert bm.num_free_blocks == 5

    # The child only needs its own block for the rest of the prompt.
    assert bm.num_required_blocks(child, 2) == 1
    bm.allocate(child, 2)
    bm.free(parent)
    assert bm.num_free_blocks == 5  # shared blocks still held by the child
    bm.free(child)
    assert bm.num_free_blocks == 8 and bm.ref_counts == [0] * 8


def test_fork_is_limited_by_what_the_parent_computed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = make_seq(0, 12, "r"), make_seq(1, 12, "r")
    bm.allocate(parent, 12)
    parent.num_computed_tokens = 5  # only one block's KV is written
    assert bm.fork(parent, child, 11) == 4
    assert child.block_ids == parent.block_ids[:1]
    other = make_seq(2, 12, "r")
    assert bm.fork(parent, other, 3) == 0  # less than a block: nothing shared
    assert other.block_ids == [] and other.num_computed_tokens == 0


def test_fork_into_sequence_that_owns_blocks_raises() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    parent, child = make_seq(0, 4), make_seq(1, 4)
    bm.allocate(parent, 4)
    parent.num_computed_tokens = 4
    bm.allocate(child, 1)
    with pytest.raises(ValueError, match="still owns blocks"):
        bm.fork(parent, child, 3)


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


# ------------------------------------------------------------------ prefix caching


def seq_of(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(
        seq_id, f"req-{seq_id}", tokens, SimpleNamespace(logprobs=None, prompt_logprobs=None)
    )


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'run' the whole sequence, as the scheduler does for one prefill."""
    bm.allocate(seq, len(seq))
    bm.cache_full_blocks(seq, len(seq))
    seq.num_computed_tokens = len(seq)


def test_block_names_chain_over_the_prefix() -> None:
    a = hash_block_tokens(b"", [1, 2, 3, 4])
    assert a == hash_block_tokens(b"", [1, 2, 3, 4])
    assert a != hash_block_tokens(b"", [4, 3, 2, 1])
    # The same tokens after a different first block are a different prefix.
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(
        hash_block_tokens(b"", [1, 2, 3, 9]), [5, 6, 7, 8]
    )
    # Packed at a fixed width: no two token lists give the same bytes.
    assert hash_block_tokens(b"", [1, 256]) != hash_block_tokens(b"", [256, 1])


def test_finished_prefix_is_found_by_a_later_sequence() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, list(range(10)))
    compute(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    # Two full blocks stay cached (evictable); the partial third one is plainly free.
    assert len(bm.evictable) == 2 and bm.num_free_blocks == 8

    b = seq_of(1, list(range(9)) + [99, 98])
    hits = bm.find_cached_prefix(b)
    assert hits == a_blocks[:2]
    assert bm.ref_counts[hits[0]] == 0  # a lookup changes nothing
    bm.share_prefix(b, hits)
    assert b.num_computed_tokens == 8 and not bm.evictable
    assert [bm.ref_counts[i] for i in hits] == [1, 1]
    assert bm.num_free_blocks == 6

    # A prefix that differs in its first block finds nothing, even if later blocks match.
    c = seq_of(2, [50] + list(range(1, 10)))
    assert bm.find_cached_prefix(c) == []


def test_lookup_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, list(range(8)))
    compute(bm, a)
    bm.free(a)
    # The same 8 tokens again: both blocks are cached, but the last token must run to
    # give logits, so only the first block is lent.
    assert len(bm.find_cached_prefix(seq_of(1, list(range(8))))) == 1
    assert len(bm.find_cached_prefix(seq_of(2, list(range(9))))) == 2


def test_plain_free_blocks_go_first_then_least_recently_used_cached_ones() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = seq_of(0, [1, 2]), seq_of(1, [3, 4])
    compute(bm, old)
    compute(bm, new)
    bm.free(old)
    bm.free(new)
    assert list(bm.evictable) == [old_block := 0, new_block := 1]

    x = seq_of(2, [7, 7, 7, 7, 7])
    assert bm.allocate(x, 3) == [2, 3]  # the never-used blocks, cache untouched
    assert bm.find_cached_prefix(seq_of(3, [1, 2, 0])) == [old_block]
    assert bm.allocate(x, 5) == [old_block]  # then the least recently used cached block
    assert bm.find_cached_prefix(seq_of(3, [1, 2, 0])) == []  # evicted: no longer found
    assert bm.find_cached_prefix(seq_of(4, [3, 4, 0])) == [new_block]


def test_reuse_refreshes_a_block_in_the_eviction_order() -> None:
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    a, b = seq_of(0, [1, 2]), seq_of(1, [3, 4])
    compute(bm, a)
    compute(bm, b)
    bm.free(a)
    bm.free(b)
    again = seq_of(2, [1, 2, 5])
    bm.share_prefix(again, bm.find_cached_prefix(again))  # a's block used again
    bm.free(again)
    assert list(bm.evictable) == [1, 0]  # b's block is now the least recently used


def test_same_prefix_computed_twice_at_once_keeps_one_cached_copy() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = seq_of(0, [1, 2, 3]), seq_of(1, [1, 2, 3])
    compute(bm, a)
    compute(bm, b)  # missed: b computed the same block into another block id
    assert bm.block_hashes[b.block_ids[0]] is None
    named = a.block_ids[0]
    bm.free(b)
    bm.free(a)
    assert list(bm.evictable) == [named]
    assert bm.find_cached_prefix(seq_of(2, [1, 2, 9])) == [named]
    assert bm.num_free_blocks == 4


def test_reset_prefix_cache_forgets_unused_blocks_only() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    kept, dropped = seq_of(0, [1, 2, 3]), seq_of(1, [4, 5, 6])
    compute(bm, kept)
    compute(bm, dropped)
    bm.free(dropped)
    assert bm.reset_prefix_cache() == 1
    assert bm.find_cached_prefix(seq_of(2, [4, 5, 6])) == []
    assert bm.find_cached_prefix(seq_of(3, [1, 2, 3])) == kept.block_ids[:1]
    assert bm.num_free_blocks == 2


def test_without_prefix_caching_nothing_is_named_or_found() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of(0, [1, 2, 3])
    compute(bm, a)
    bm.free(a)
    assert not bm.evictable and bm.block_hashes == [None] * 4
    assert bm.find_cached_prefix(seq_of(1, [1, 2, 3])) == []
