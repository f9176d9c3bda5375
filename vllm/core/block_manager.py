"""Paged KV cache block allocator with automatic prefix caching. Pure Python: no torch,
unit-tested alone.

The KV cache is one flat pool of ``num_blocks`` blocks of ``block_size`` token slots
each. A sequence owns the list of block ids that hold its keys/values in order;
token ``t`` of a sequence lives in slot ``t % block_size`` of ``seq.block_ids[t //
block_size]``. Blocks carry a reference count so several sequences can read one block:
siblings of an ``n`` > 1 request share their prompt's full blocks, and with prefix
caching any sequence reuses the full blocks of an earlier one with the same prefix.

Prefix caching names a full block by a SHA-256 chain over its tokens and the name of the
block before it, so a name stands for the whole prefix up to that block's end. A block
gets its name when the step that fills it is scheduled; from then on a lookup can find
it, including in that same step (the attention backend writes every new token's KV
before any attention reads the cache). A named block that no sequence references stays
in the cache, evictable, until an allocation needs room: then the least recently used
one is evicted. Nothing ever writes into a named block: a sequence only writes at or
past its computed length, and a lookup always leaves the prompt's last token to compute.

Blocks holding no cached KV are handed out first, most recently freed first: their
memory is already mapped and likely still in the CPU caches, while a never-used block
costs page faults on its first write (on the CPU the cache is allocated untouched).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from vllm.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """The name of a full block: SHA-256 of the previous block's name and the tokens.

    A strong hash, so two different prefixes never share a name in practice; token ids
    are packed as 64-bit integers, so no two token lists pack alike.
    """
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Hands out KV cache blocks, takes them back, and keeps full ones for reuse."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Unreferenced blocks that hold no cached KV; taken from the left.
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        # Prefix cache: name -> block, each named block's name, and the named blocks no
        # sequence references, least recently used first.
        self.cached_blocks: dict[bytes, int] = {}
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # Prompt tokens looked up in the prefix cache, and how many of them were found.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used or freed ones plus evictable ones."""
        return len(self.free_block_ids) + len(self.evictable)

    def num_required_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so ``seq`` has a slot for every computed token plus the new ones."""
        needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_required_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Append enough blocks to ``seq.block_ids`` for ``num_new_tokens``; return the new ids.

        The new ids are returned so the scheduler can send workers only the delta.
        """
        num_blocks = self.num_required_blocks(seq, num_new_tokens)
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(
                f"Sequence {seq.seq_id} needs {num_blocks} more KV cache blocks but only "
                f"{self.num_free_blocks} are free; check can_allocate() first."
            )
        new_ids = [self._take_free_block() for _ in range(num_blocks)]
        for block_id in new_ids:
            self.ref_counts[block_id] = 1
        seq.block_ids.extend(new_ids)
        return new_ids

    def share_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give ``seq``, which owns no blocks, the computed KV of ``block_ids`` as its first
        blocks: it then starts computing after them."""
        if seq.block_ids:
            raise ValueError(
                f"Cannot share blocks into sequence {seq.seq_id}: it still owns blocks "
                f"{seq.block_ids}; free it first."
            )
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]  # a cached block back in use
            self.ref_counts[block_id] += 1
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = len(block_ids) * self.block_size

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> int:
        """Let ``child`` reuse the KV of the parent's first ``num_tokens`` tokens; return how many.

        Only full blocks whose KV the parent has already computed are shared.
        """
        shareable = min(
            num_tokens, parent.num_computed_tokens, len(parent.block_ids) * self.block_size
        )
        self.share_prefix(child, parent.block_ids[: max(0, shareable) // self.block_size])
        return child.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks no one references go back to the pool,
        named ones as evictable (the sequence's last blocks first in line for eviction).

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
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.appendleft(block_id)
                else:
                    self.evictable[block_id] = None
        seq.block_ids = []

    # ------------------------------------------------------------ prefix caching

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest prefix of ``seq``'s tokens, at most all
        but its last token (which must run to give logits); changes nothing."""
        if not self.enable_prefix_caching:
            return []
        num_blocks = (len(seq) - 1) // self.block_size
        hashes = self._block_hashes(seq, num_blocks)
        hits = []
        for block_hash in hashes[:num_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted sequence's prefix-cache lookup, in tokens."""
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the blocks of ``seq`` that its first ``num_tokens`` tokens fill, so later
        lookups find them. Blocks before the sequence's computed length are named already.

        A block whose name another block already holds (two sequences computed the same
        prefix at once) stays unnamed and is freed as an ordinary block.
        """
        first, end = seq.num_computed_tokens // self.block_size, num_tokens // self.block_size
        if not self.enable_prefix_caching or end <= first:
            return
        hashes = self._block_hashes(seq, end)
        for i in range(first, end):
            block_id = seq.block_ids[i]
            if self.block_hashes[block_id] is None and hashes[i] not in self.cached_blocks:
                self.block_hashes[block_id] = hashes[i]
                self.cached_blocks[hashes[i]] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no sequence uses; return how many were dropped."""
        dropped = len(self.evictable)
        while self.evictable:
            self.free_block_ids.appendleft(self._evict())
        return dropped

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """``seq.block_hashes``, extended to name at least its first ``num_blocks`` full
        blocks. Names are kept on the sequence: its tokens are only ever appended."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block_tokens(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _take_free_block(self) -> int:
        if self.free_block_ids:
            return self.free_block_ids.popleft()
        return self._evict()

    def _evict(self) -> int:
        """Drop the least recently used evictable block from the cache; return its id."""
        block_id, _ = self.evictable.popitem(last=False)
        del self.cached_blocks[self.block_hashes[block_id]]
        self.block_hashes[block_id] = None
        return block_id
