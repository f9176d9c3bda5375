"""Paged KV cache block allocator. Pure Python: no torch, unit-tested alone.

The KV cache is one flat pool of ``num_blocks`` blocks of ``block_size`` token slots
each. A sequence owns the list of block ids that hold its keys/values in order;
token ``t`` of a sequence lives in slot ``t % block_size`` of ``seq.block_ids[t //
block_size]``. Blocks carry a reference count so siblings of an ``n`` > 1 request
can share the full blocks of their common prompt instead of computing it ``n`` times.

Freed blocks are handed out again first (last in, first out). Their memory is already
mapped and likely still cached, while a never-used block costs page faults on its first
write: on the CPU, where the cache is allocated without being touched, cycling through
the whole pool made each decode step's KV writes several times slower.
"""

from __future__ import annotations

from collections import deque

from vllm.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class BlockManager:
    """Hands out KV cache blocks and takes them back when no sequence uses them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_required_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so ``seq`` has a slot for every computed token plus the new ones."""
        needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_required_blocks(seq, num_new_tokens) <= len(self.free_block_ids)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Append enough blocks to ``seq.block_ids`` for ``num_new_tokens``; return the new ids.

        The new ids are returned so the scheduler can send workers only the delta.
        """
        num_blocks = self.num_required_blocks(seq, num_new_tokens)
        if num_blocks > len(self.free_block_ids):
            raise RuntimeError(
                f"Sequence {seq.seq_id} needs {num_blocks} more KV cache blocks but only "
                f"{len(self.free_block_ids)} are free; check can_allocate() first."
            )
        new_ids = [self.free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in new_ids:
            self.ref_counts[block_id] = 1
        seq.block_ids.extend(new_ids)
        return new_ids

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> int:
        """Let ``child`` reuse the KV of the parent's first ``num_tokens`` tokens; return how many.

        Only full blocks whose KV the parent has already computed are shared. Neither
        sequence ever writes into a shared block (writes go at or past its computed
        length, which lies beyond them), so sharing needs no copy-on-write.
        """
        if child.block_ids:
            raise ValueError(
                f"Cannot fork into sequence {child.seq_id}: it still owns blocks "
                f"{child.block_ids}; free it first."
            )
        shareable = min(
            num_tokens, parent.num_computed_tokens, len(parent.block_ids) * self.block_size
        )
        num_shared_blocks = max(0, shareable) // self.block_size
        shared = parent.block_ids[:num_shared_blocks]
        for block_id in shared:
            self.ref_counts[block_id] += 1
        child.block_ids = list(shared)
        child.num_computed_tokens = num_shared_blocks * self.block_size
        return child.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks no one references go back to the pool.

        ``seq.block_ids`` is emptied, so freeing the same sequence twice is a no-op.
        """
        for block_id in reversed(seq.block_ids):
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(
                    f"Block {block_id} of sequence {seq.seq_id} is already free; "
                    "the block table is corrupt."
                )
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.appendleft(block_id)
        seq.block_ids = []
