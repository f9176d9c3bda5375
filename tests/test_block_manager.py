"""BlockManager: allocation, reference counts, fork and exhaustion (pure Python, no torch)."""

from types import SimpleNamespace

import pytest

from vllm.core.block_manager import BlockManager
from vllm.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int, request_id: str | None = None) -> Sequence:
    return Sequence(
        seq_id,
        request_id or f"req-{seq_id}",
        list(range(100, 100 + num_tokens)),
        SimpleNamespace(logprobs=None),
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
