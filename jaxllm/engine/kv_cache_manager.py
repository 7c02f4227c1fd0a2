"""The host's view of the paged KV pool: which request holds which block.

Blocks are reference counted. Full blocks are hashed (parent hash + token ids) and stay findable
after they are freed, so a later request with the same prefix reuses them (automatic prefix
caching); freed blocks wait in a least-recently-used queue and lose their hash only when they are
handed out again. A block held by several requests is never written: a request about to write into
one gets a private copy first (copy-on-write), reported as a (src, dst) pair for the runner.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from jaxllm.engine.request import Request

NULL_BLOCK_ID = 0  # padding tokens write here; never handed out


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block; sha256 so that a collision cannot serve wrong K/V."""
    digest = hashlib.sha256(parent or b"")
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


def salt_hash(cache_salt: str | None) -> bytes | None:
    """The parent hash of a salted request's first block (None: unsalted)."""
    if cache_salt is None:
        return None
    return hashlib.sha256(b"jaxllm cache_salt\0" + cache_salt.encode()).digest()


def root_hash(cache_salt: str | None, lora_int_id: int | None = None) -> bytes | None:
    """The parent hash of a request's first block: its salt's, and its LoRA adapter's on top (the
    same tokens give other K/V under another adapter); None for neither."""
    root = salt_hash(cache_salt)
    if lora_int_id is None:
        return root
    return hashlib.sha256(b"jaxllm lora\0" + (root or b"") + str(lora_int_id).encode()).digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ComputedBlocks:
    """Leading blocks of a request found in the prefix cache."""

    block_ids: tuple[int, ...]
    num_tokens: int  # len(block_ids) * block_size


NO_COMPUTED_BLOCKS = ComputedBlocks((), 0)


@dataclass(frozen=True)
class Allocation:
    """What one successful ``allocate_slots`` changed."""

    new_block_ids: tuple[int, ...]  # freshly taken from the free queue, appended to the table
    block_copies: tuple[tuple[int, int], ...]  # (src, dst): copy-on-write, before the step runs


@dataclass(frozen=True)
class PrefixCacheStats:
    queries: int  # tokens looked up (whole sequences at admission)
    hits: int  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(frozen=True)
class SlotUsage:
    """Token slots of the blocks some requests hold, each block counted once however shared."""

    allocated: int  # distinct blocks held * block_size
    filled: int  # of those, slots whose K/V are in the pool


@dataclass(frozen=True)
class Holdings:
    """Blocks and computed tokens of some requests at one moment (see ``KVCacheManager.holdings``)."""

    shared: bool  # entries carry block ids (some block was shared) rather than block counts
    entries: list  # (block ids or number of blocks, num_computed_tokens) per request


class BlockPool:
    """Reference counts, content hashes and the LRU free queue of all blocks."""

    def __init__(self, num_blocks: int):
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.num_shared = 0  # blocks with more than one holder
        # Head is evicted first. Block 0 is the null block and never enters.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, n: int) -> list[int]:
        """Hand out ``n`` blocks from the LRU head, dropping their cached content."""
        if n > self.num_free:
            raise ValueError(f"asked for {n} blocks but only {self.num_free} are free")
        block_ids = [self.free_queue.popitem(last=False)[0] for _ in range(n)]
        for block_id in block_ids:
            self._evict(block_id)
            self.ref_counts[block_id] = 1
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to each block; a free one leaves the free queue (cache hit or fork)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
            if self.ref_counts[block_id] == 2:
                self.num_shared += 1

    def release(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 1:
                self.num_shared -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Make a full block findable; the first block with given content stays the cached one."""
        if self.hashes[block_id] is None and block_hash not in self.cached:
            self.hashes[block_id] = block_hash
            self.cached[block_hash] = block_id

    def forget_contents(self) -> None:
        """Drop every block's content hash: nothing is found by the prefix cache until registered again."""
        self.cached.clear()
        self.hashes = [None] * len(self.hashes)

    def _evict(self, block_id: int) -> None:
        block_hash = self.hashes[block_id]
        if block_hash is not None:
            del self.cached[block_hash]
            self.hashes[block_id] = None


class KVCacheManager:
    """Block tables of all live requests over one :class:`BlockPool` (vLLM v1's KVCacheManager).

    Args:
        num_blocks: blocks in the pool, including the null block 0.
        block_size: tokens per block.
        enable_prefix_caching: hash full blocks and reuse them across requests.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks!r} must be an integer >= 2 (block 0 is the null block)")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive integer")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks of each table already hashed
        self._queries = 0
        self._hits = 0

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return len(self.pool.ref_counts) - 1

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.pool.num_free

    @property
    def num_shared_blocks(self) -> int:
        """Blocks held by more than one request."""
        return self.pool.num_shared

    @property
    def num_held_blocks(self) -> int:
        """Distinct blocks live requests hold (retained and running alike)."""
        return len({b for t in self._tables.values() for b in t})

    @property
    def num_block_references(self) -> int:
        """Blocks the live requests would hold if nothing were shared."""
        return sum(len(t) for t in self._tables.values())

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queries, self._hits)

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        return tuple(self._tables.get(request_id, ()))

    def ref_count(self, block_id: int) -> int:
        return self.pool.ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self.pool.hashes[block_id]

    def free_block_ids(self) -> tuple[int, ...]:
        """Free blocks in eviction order (first handed out first)."""
        return tuple(self.pool.free_queue)

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def slot_usage(self, requests: Iterable[Request]) -> SlotUsage:
        """Allocated and filled slots of the blocks ``requests`` hold; O(requests) unless shared."""
        return self.usage_of(self.holdings(requests))

    def holdings(self, requests: Iterable[Request]) -> Holdings:
        """What ``requests`` hold now, for :meth:`usage_of` later: (block ids or their count,
        computed tokens) each; block ids only while some block is shared."""
        shared = self.pool.num_shared > 0
        tables = self._tables
        if shared:
            return Holdings(True, [(tuple(tables.get(r.request_id, ())), r.num_computed_tokens) for r in requests])
        return Holdings(False, [(len(tables.get(r.request_id, ())), r.num_computed_tokens) for r in requests])

    def usage_of(self, holdings: Holdings, keep: Iterable[bool] | None = None) -> SlotUsage:
        """Slot usage of ``holdings`` (the entries where ``keep`` is true)."""
        entries = holdings.entries if keep is None else [e for e, k in zip(holdings.entries, keep, strict=True) if k]
        if not holdings.shared:
            return SlotUsage(sum(n for n, _ in entries) * self.block_size, sum(c for _, c in entries))
        # A shared block is never written, so its holders agree on its content; take the fullest.
        filled: dict[int, int] = {}
        for block_ids, computed in entries:
            for i, block_id in enumerate(block_ids):
                fill = min(self.block_size, max(0, computed - i * self.block_size))
                filled[block_id] = max(fill, filled.get(block_id, 0))
        return SlotUsage(len(filled) * self.block_size, sum(filled.values()))

    # -- changes -----------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest cached prefix of a request not yet holding blocks.

        Never the whole sequence: the last token is always recomputed so that there is a
        position to sample from, and so that no write ever lands in a shared full block.
        """
        if not self.enable_prefix_caching or request.request_id in self._tables:
            return NO_COMPUTED_BLOCKS
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        block_ids = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return ComputedBlocks(tuple(block_ids), len(block_ids) * self.block_size)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks = NO_COMPUTED_BLOCKS
    ) -> Allocation | None:
        """Make room for ``num_new_tokens`` after the computed ones; None when the pool is short.

        Args:
            request: its ``num_computed_tokens`` tokens are already in the pool.
            num_new_tokens: tokens to compute this step, after ``computed``.
            computed: cache hits from ``get_computed_blocks`` (first allocation only).
        Returns:
            The blocks taken and the copies to make, or None, in which case nothing changed.
        """
        table = self._tables.get(request.request_id, [])
        start = request.num_computed_tokens + computed.num_tokens
        num_new = max(0, self.num_blocks_for(start + num_new_tokens) - len(table) - len(computed.block_ids))
        # Blocks from the one holding position ``start`` on get written; shared ones need a copy.
        shared = [i for i in range(start // self.block_size, len(table)) if self.ref_count(table[i]) > 1]
        # A cache hit on a free block takes it out of the free queue too.
        num_revived = sum(1 for b in computed.block_ids if self.ref_count(b) == 0)
        if num_new + len(shared) + num_revived > self.pool.num_free:
            return None
        if request.request_id not in self._tables:
            self._record_lookup(request, computed)
        self.pool.touch(computed.block_ids)
        table = self._tables.setdefault(request.request_id, table)
        table.extend(computed.block_ids)
        copies = tuple(self._copy_on_write(table, i) for i in shared)
        new_block_ids = self.pool.take(num_new)
        table.extend(new_block_ids)
        self._register_full_blocks(request, start)
        return Allocation(tuple(new_block_ids), copies)

    def free(self, request: Request) -> None:
        """Release a request's blocks; call before resetting its ``num_computed_tokens``.

        Full blocks it computed are registered first, so its prefix stays reusable; tail blocks
        go to the free queue first, so the shared-looking prefix blocks are evicted last.
        """
        if request.request_id not in self._tables:
            return
        self._register_full_blocks(request, request.num_computed_tokens)
        table = self._tables.pop(request.request_id)
        del self._num_registered[request.request_id]
        self.pool.release(reversed(table))

    def swap_out(self, request: Request) -> tuple[int, ...]:
        """Free a request's blocks like ``free``; returns those holding its computed K/V, in
        table order, whose content the runner saves to host memory before anything reuses them."""
        computed = self.block_ids(request.request_id)[: self.num_blocks_for(request.num_computed_tokens)]
        self.free(request)
        return computed

    def swap_in(self, request: Request, num_blocks: int) -> tuple[int, ...]:
        """A fresh table of ``num_blocks`` blocks for a swapped-out request's saved K/V.

        The caller checks there is room; the blocks are registered for prefix caching by the
        next ``allocate_slots``, whose step runs after the runner has copied their content back.
        """
        if request.request_id in self._tables:
            raise ValueError(f"request {request.request_id!r} already holds blocks")
        block_ids = self.pool.take(num_blocks)
        self._tables[request.request_id] = block_ids
        self._num_registered[request.request_id] = 0
        return tuple(block_ids)

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` share all of ``parent``'s blocks (parallel sampling, beam search).

        The caller sets ``child.num_computed_tokens`` to the parent's; the next write into the
        shared partial block then copies it.
        """
        if child.request_id in self._tables:
            raise ValueError(f"fork child {child.request_id!r} already holds blocks")
        table = self._tables[parent.request_id]
        self.pool.touch(table)
        self._tables[child.request_id] = list(table)
        self._num_registered[child.request_id] = self._num_registered[parent.request_id]
        child.block_hashes = list(parent.block_hashes)

    # -- helpers -----------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Forget the content of every cached block (vLLM's: after new weights, or between
        benchmark runs). Only while no request holds a block; returns False, changing nothing,
        otherwise. Hit and query counts are kept (they are counters)."""
        if self.num_used_blocks:
            return False
        self.pool.forget_contents()
        return True

    def _record_lookup(self, request: Request, computed: ComputedBlocks) -> None:
        self._num_registered[request.request_id] = len(computed.block_ids)
        if self.enable_prefix_caching:
            self._queries += request.num_tokens
            self._hits += computed.num_tokens

    def _copy_on_write(self, table: list[int], index: int) -> tuple[int, int]:
        src = table[index]
        (dst,) = self.pool.take(1)
        self.pool.release([src])
        table[index] = dst
        return src, dst

    def _register_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        # Only blocks whose K/V a finished step has written are registered: a block registered at
        # allocation time could be hit by another request before its content exists.
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        self._extend_hashes(request, num_full)
        table = self._tables[request.request_id]
        for i in range(self._num_registered[request.request_id], num_full):
            self.pool.register(table[i], request.block_hashes[i])
        self._num_registered[request.request_id] = max(num_full, self._num_registered[request.request_id])

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        hashes, size = request.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            lora = request.lora_request
            parent = hashes[-1] if hashes else root_hash(request.cache_salt, lora and lora.lora_int_id)
            hashes.append(hash_block(parent, request.token_ids_in(i * size, (i + 1) * size)))
