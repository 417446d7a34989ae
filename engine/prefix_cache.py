"""The prefix cache: the KV of prompt prefixes kept after their prefill, reused by later prompts that start
with the same tokens (docs/architecture.md, "Prefix caching").

A prompt is cut into whole blocks of `block_size` tokens. Block i's key hashes block i-1's key and block i's
tokens, so a key names the whole prefix up to the end of its block: two prompts share block i's KV only if they
agree on every token before it. A lookup walks the prompt's keys from the first block and stops at the first
miss; it never covers the prompt's last token, whose logits the prefill must compute to sample.

Entries are evicted least recently used first. A lookup or an insert refreshes a prefix's blocks from the
deepest to the first, so a block is never less recent than a block that extends it: eviction takes the ends of
prefixes first and never strands a block behind a missing parent.

The cache holds device bytes, counted as held memory by the capacity controller, and it is the first thing
given back under memory pressure: the scheduler evicts from it before any running request is preempted
(engine/memory_controller.py, `evict_bytes`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import RowKV

_ROOT = b""


def block_keys(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained key of every whole block of `token_ids` (a key depends on all tokens before its block's end)."""
    keys: list[bytes] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = torch.tensor(token_ids[start : start + block_size], dtype=torch.int64).numpy().tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass
class _Block:
    parent: bytes  # the key of the block before it (_ROOT for the first)
    kv: RowKV  # keys/values [layers, kv_heads, block_size, head_dim]


class PrefixCache:
    """Blocks of prompt KV by chained key, least recently used first; at most `max_tokens` tokens."""

    def __init__(self, block_size: int, max_tokens: int) -> None:
        if block_size < 1 or max_tokens < 0:
            raise ValueError(f"block_size must be >= 1 and max_tokens >= 0, got {block_size}, {max_tokens}")
        self.block_size, self.max_tokens = block_size, max_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._bytes = 0
        self.evicted_blocks = 0  # cumulative

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def nbytes(self) -> int:
        """Device bytes the cached blocks hold."""
        return self._bytes

    def lookup(self, token_ids: Sequence[int]) -> RowKV | None:
        """The KV of the longest cached prefix of whole blocks that leaves at least one token of `token_ids`
        to compute, oldest token first ([layers, kv_heads, cached, head_dim]); None on a miss."""
        keys = block_keys(token_ids[:-1], self.block_size)
        found: list[bytes] = []
        for key in keys:
            if key not in self._blocks:
                break
            found.append(key)
        if not found:
            return None
        self._refresh(found)
        blocks = [self._blocks[k].kv for k in found]
        return RowKV(torch.cat([b.keys for b in blocks], dim=2), torch.cat([b.values for b in blocks], dim=2))

    def insert(self, token_ids: Sequence[int], kv: RowKV) -> None:
        """File the whole blocks of a prefill's tokens, `kv` their KV ([layers, kv_heads, >= len, head_dim]).
        Blocks already cached are only refreshed; nothing is kept when the cache is bounded at 0 tokens."""
        assert kv.length >= len(token_ids), (kv.length, len(token_ids))
        keys = block_keys(token_ids, self.block_size)[: self.max_tokens // self.block_size]
        parent = _ROOT
        for i, key in enumerate(keys):
            if key not in self._blocks:
                cols = slice(i * self.block_size, (i + 1) * self.block_size)
                block = RowKV(kv.keys[:, :, cols].clone(), kv.values[:, :, cols].clone())
                self._blocks[key] = _Block(parent, block)
                self._bytes += block.nbytes()
            parent = key
        self._refresh(keys)
        while self.tokens > self.max_tokens:
            self._evict_one()

    def evict(self, nbytes: int) -> int:
        """Drop least recently used blocks until at least `nbytes` are freed (or the cache is empty); the bytes
        freed."""
        freed = 0
        while freed < nbytes and self._blocks:
            freed += self._evict_one()
        return freed

    def clear(self) -> None:
        self.evict(self._bytes)

    def _refresh(self, keys: list[bytes]) -> None:
        """Mark a prefix's blocks most recently used, its first block last (the most recent of all)."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _evict_one(self) -> int:
        _, block = self._blocks.popitem(last=False)
        freed = block.kv.nbytes()
        self._bytes -= freed
        self.evicted_blocks += 1
        return freed

    def check_invariants(self) -> None:
        """Every block's parent is cached and more recent than it; the byte count and the bound hold."""
        order = {key: i for i, key in enumerate(self._blocks)}
        for key, block in self._blocks.items():
            assert block.parent == _ROOT or block.parent in order, "a cached block lost its parent"
            assert block.parent == _ROOT or order[block.parent] > order[key], "a parent is less recent than its child"
            assert block.kv.length == self.block_size
        assert self._bytes == sum(b.kv.nbytes() for b in self._blocks.values())
        assert self.tokens <= self.max_tokens
