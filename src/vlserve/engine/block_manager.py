"""KV blocks: who holds which block, and which computed blocks can be reused by a later prompt.

Torch-free bookkeeping over the block ids of the engine's KV pool (``kv_cache.KVPool``).

Invariants:
- a block is either held (``ref_count > 0``, in some sequence's block table) or free;
- a free block keeps its hash until it is handed out again, so it can still be hit: free blocks
  are evicted least recently freed first (the tail blocks of a sequence are freed first);
- a block gets a hash only once it is full and its KV has been computed;
- a block's hash covers every token before and in it, the content of every image whose tokens it
  holds (image placeholder ids are the same for every image) and, from the first block on, the
  request's ``cache_salt``, so two prompts share a block only when their KV is the same;
- block 0 is never handed out: it is where padding reads and writes go.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

NULL_BLOCK = 0


class BlockSequence(Protocol):
    """What the block manager needs of a sequence."""

    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[bytes]
    num_cached_tokens: int  # tokens whose KV is in the cache: a prefix hit, then computed ones
    cache_salt: str | None

    @property
    def num_tokens(self) -> int: ...

    def image_keys(self, start: int, end: int) -> Seq[bytes]:
        """Content keys of the images whose tokens lie in ``[start, end)``, in order."""
        ...


@dataclass
class _Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None


def block_hash(
    parent: bytes | None, tokens: Seq[int], images: Seq[bytes], salt: str | None
) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(b"salt:" + (salt or "").encode() + b"\0")
    else:
        h.update(parent)
    h.update(b",".join(str(t).encode() for t in tokens))
    for key in images:
        h.update(b"|img:" + key)
    return h.digest()


class BlockManager:
    """Allocation, sharing and LRU eviction of fixed-size KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("need at least 2 blocks (one is the null block) of >= 1 token")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # hash → block id
        self.num_hit_tokens = 0  # totals, for metrics and tests
        self.num_queried_tokens = 0

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks a sequence can ever use (the null block excluded)."""
        return len(self._blocks) - 1

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix lookup --------------------------------------------------------------------------
    def _hashes(self, seq: BlockSequence, num_tokens: int) -> list[bytes]:
        """The hashes of the full blocks among the first ``num_tokens`` tokens (memoized on seq)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else None
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            seq.block_hashes.append(
                block_hash(parent, tokens, seq.image_keys(i * bs, (i + 1) * bs), seq.cache_salt)
            )
        return seq.block_hashes[: num_tokens // bs]

    def _hits(self, seq: BlockSequence) -> list[int]:
        """Cached blocks for the longest prefix of ``seq``, leaving at least its last token to
        compute (the next token's logits come from it)."""
        if not self.prefix_caching:
            return []
        hits: list[int] = []
        for h in self._hashes(seq, seq.num_tokens - 1):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def lookup(self, seq: BlockSequence) -> int:
        """How many of ``seq``'s tokens the prefix cache holds now."""
        return len(self._hits(seq)) * self.block_size

    # -- allocation -------------------------------------------------------------------------------
    def can_allocate(self, seq: BlockSequence, reserve_blocks: int = 0) -> bool:
        """Whether ``seq``'s blocks fit now, leaving ``reserve_blocks`` free."""
        hits = self._hits(seq)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)  # taken off the free list
        fresh = self.blocks_for(seq.num_tokens) - len(hits)
        return fresh + revived + reserve_blocks <= len(self._free)

    def allocate(self, seq: BlockSequence) -> None:
        """Give ``seq`` its blocks: the cached prefix shared, the rest fresh."""
        if seq.block_table:
            raise ValueError("sequence already holds blocks")
        if not self.can_allocate(seq):
            raise MemoryError("not enough free KV blocks")
        hits = self._hits(seq)
        for b in hits:
            self._hold(b)
        seq.block_table = hits + [
            self._take_fresh() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))
        ]
        seq.num_cached_tokens = len(hits) * self.block_size
        self.num_hit_tokens += seq.num_cached_tokens
        self.num_queried_tokens += seq.num_tokens

    def can_append(self, seq: BlockSequence) -> bool:
        """Whether the token being added to ``seq`` has a slot (a new block may be needed)."""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or bool(self._free)

    def append(self, seq: BlockSequence) -> None:
        """Make room for ``seq``'s newest token (call after ``can_append``)."""
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take_fresh())

    def commit(self, seq: BlockSequence, num_computed: int) -> None:
        """``seq``'s first ``num_computed`` tokens now have their KV: publish its full blocks."""
        first = seq.num_cached_tokens // self.block_size  # blocks before it were handled
        seq.num_cached_tokens = num_computed
        if not self.prefix_caching:
            return
        hashes = self._hashes(seq, num_computed)
        for i in range(first, len(hashes)):
            h, block = hashes[i], self._blocks[seq.block_table[i]]
            if block.hash is None and h not in self._cached:
                block.hash = h
                self._cached[h] = block.id

    def free(self, seq: BlockSequence) -> None:
        """Release ``seq``'s blocks, tail first, so its prefix stays cached longest."""
        for b in reversed(seq.block_table):
            block = self._blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _hold(self, b: int) -> None:
        block = self._blocks[b]
        if block.ref_count == 0:
            del self._free[b]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """The least recently freed block, its cached content evicted."""
        b, _ = self._free.popitem(last=False)
        block = self._blocks[b]
        if block.hash is not None:
            if self._cached.get(block.hash) == b:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return b

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (held blocks stay held)."""
        self._cached.clear()
        for block in self._blocks:
            block.hash = None
