"""Which prompt prefixes each engine replica holds in its KV cache, learned from vLLM's own
KV cache events (``kv_events_config``: BlockStored, BlockRemoved, AllBlocksCleared), and how
many tokens of a request's prompt each replica already has.

**Keys: token content, not vLLM's hashes.** Every BlockStored event carries the stored blocks'
``token_ids``, their ``block_size``, the vLLM hash of the block before them
(``parent_block_hash``) and each block's extra hash keys (``extra_keys``: the tenant's
``cache_salt`` on a prompt's first block, a LoRA name, multimodal ids). The index turns each
stored block into a *content key*: BLAKE2b over (the parent block's content key, the block's
token ids, its extra keys). A content key therefore names the whole token prefix up to the end
of its block, salt included. A request's prompt gets the same chain of content keys from its
token ids and its salt (``PromptKeys``), and a replica's hit is the number of leading keys it
holds, times the block size.

The router does not recompute vLLM's own block hashes, on purpose: they depend on the
engine's ``prefix_caching_hash_algo`` (sha256, sha256_cbor, xxhash, ...), on ``NONE_HASH``,
whose seed is ``PYTHONHASHSEED`` when set (and a per-process random one for the
non-cryptographic algorithms), on vLLM's private tuple encoding, and, with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (on by default), events carry them cut to 64 bits.
Tying the router to all of that would make a quiet setting change into silent misses (or
worse). vLLM's hashes are used here only as each replica's handles: to find a stored block's
parent and to find the block an eviction names.

**Tenants.** vLLM puts the request's ``cache_salt`` into its first block's extra keys, so the
salt is in every content key of the chain: prompts of two tenants never share a key, and a
request without a salt never matches a salted block.

**Never a wrong match.** A replica's entry is the result of applying one unbroken run of its
event batches, in sequence order, from a known start (empty). What the index does not know it
leaves out, so it can only under-report:

* a sequence gap (a batch lost: the subscriber fell behind the publisher's high-water mark) or
  a sequence that goes backwards (the engine restarted) clears the replica's entry and starts a
  new run there; blocks the engine stored before the new run are unknown (no match) until
  stored again, and removals of unknown blocks are ignored;
* a block whose parent is unknown is not indexed (it cannot be reached from a prompt's start);
* a removal whose vLLM hash names two cached copies of one block (two requests computed it at
  once) drops the key at the first removal;
* events of another KV cache group than the first (a hybrid model) turn the replica's matching
  off: a prefix hit there needs every group, which this index does not follow;
* blocks of another medium than the engine's own cache (an offload tier) are not indexed.

The one stale answer it can give is inherent to events: an eviction the engine made in the
last few milliseconds, whose event is still in flight. That costs a slower prefill (vLLM
recomputes), never a wrong output.

This module is pure bookkeeping (no sockets): router/kv_event_feed.py subscribes to the
engines and hands their decoded batches to ``PrefixIndex.apply``.
"""
from __future__ import annotations

import threading
from array import array
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Iterable, Optional, Sequence

_KEY_BYTES = 16
_OWN_MEDIA = (None, "GPU")  # vLLM's block pool reports its own cache as "GPU", on CPU engines too


def _canonical(extra: Any) -> bytes:
    """One block's extra keys as bytes, the same whether they came from msgpack (lists) or were
    built here (tuples)."""
    if extra is None:
        return b""

    def norm(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return tuple(norm(v) for v in x)
        return x

    return repr(norm(extra)).encode()


def content_key(parent: Optional[bytes], tokens: Sequence[int], extra: Any = None) -> bytes:
    """The content key of a block: its parent's key, its token ids and its extra keys."""
    h = blake2b(digest_size=_KEY_BYTES)
    h.update(parent or b"\0" * _KEY_BYTES)
    h.update(array("q", tokens).tobytes())
    h.update(b"\xff")
    h.update(_canonical(extra))
    return h.digest()


class PromptKeys:
    """A prompt's chain of content keys (one per full block), computed once per block size.

    vLLM reads a prompt's first block's extra keys as ``(cache_salt,)`` when the request has a
    salt (no LoRA, no multimodal input: pdserve serves neither), and no extra keys for the
    other blocks."""

    def __init__(self, token_ids: Sequence[int], cache_salt: Optional[str] = None) -> None:
        self.token_ids = list(token_ids)
        self.cache_salt = cache_salt or None
        self._keys: dict[int, list[bytes]] = {}

    def __len__(self) -> int:
        return len(self.token_ids)

    def keys(self, block_size: int) -> list[bytes]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys, parent = [], None
            for start in range(0, len(self.token_ids) - block_size + 1, block_size):
                extra = (self.cache_salt,) if start == 0 and self.cache_salt else None
                parent = content_key(parent, self.token_ids[start:start + block_size], extra)
                keys.append(parent)
            self._keys[block_size] = keys
        return keys


@dataclass
class ReplicaBlocks:
    """One replica's cached blocks, as one unbroken run of its events has shown them."""

    block_size: Optional[int] = None
    next_seq: Optional[int] = None
    by_vllm_hash: dict[Any, bytes] = field(default_factory=dict)  # vLLM's hash -> content key
    held: set[bytes] = field(default_factory=set)
    multi_group: bool = False
    resets: int = 0  # runs started after a gap, a restart or a clear

    def clear(self) -> None:
        self.by_vllm_hash.clear()
        self.held.clear()


class PrefixIndex:
    """Per replica, the blocks its engine holds; for a prompt, each replica's cached tokens.

    Thread-safe: the event feed may apply batches from another thread than the one asking."""

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaBlocks] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ events in
    def apply(self, replica: str, seq: int, events: Iterable[Any]) -> None:
        """One event batch of ``replica``'s publisher, with its sequence number. A batch out of
        sequence (a gap, or a number that went backwards: the engine restarted) clears what
        the index knew of that replica and starts a new run at this batch."""
        with self._lock:
            r = self._replicas.setdefault(replica, ReplicaBlocks())
            if r.next_seq is not None and seq != r.next_seq:
                r.clear()
                r.multi_group = False
                r.resets += 1
            r.next_seq = seq + 1
            for event in events:
                self._apply_one(r, event)

    def expected_seq(self, replica: str) -> Optional[int]:
        with self._lock:
            r = self._replicas.get(replica)
            return r.next_seq if r is not None else None

    def reset(self, replica: str) -> None:
        """Forget a replica's blocks and sequence (a new subscription: another engine run)."""
        with self._lock:
            old = self._replicas.pop(replica, None)
            self._replicas[replica] = ReplicaBlocks(resets=(old.resets + 1) if old else 0)

    def drop(self, replica: str) -> None:
        """The replica left its pool."""
        with self._lock:
            self._replicas.pop(replica, None)

    def _apply_one(self, r: ReplicaBlocks, event: Any) -> None:
        kind = type(event).__name__
        if kind == "AllBlocksCleared":
            r.clear()
            return
        group = getattr(event, "group_idx", None)
        if group not in (None, 0):
            r.multi_group = True
            return
        if getattr(event, "medium", None) not in _OWN_MEDIA:
            return
        if kind == "BlockRemoved":
            for h in event.block_hashes:
                key = r.by_vllm_hash.pop(h, None)
                if key is not None:
                    r.held.discard(key)
        elif kind == "BlockStored":
            self._stored(r, event)

    @staticmethod
    def _stored(r: ReplicaBlocks, ev: Any) -> None:
        bs = ev.block_size
        if r.block_size is None:
            r.block_size = bs
        hashes = ev.block_hashes
        if bs != r.block_size or len(ev.token_ids) != bs * len(hashes):
            return  # not whole blocks of this replica's size (a partial block): not indexed
        if ev.parent_block_hash is None:
            parent = None
        else:
            parent = r.by_vllm_hash.get(ev.parent_block_hash)
            if parent is None:
                return  # its prefix is unknown here, so no prompt can reach these blocks
        extras = ev.extra_keys or [None] * len(hashes)
        if len(extras) != len(hashes):
            return
        for i, h in enumerate(hashes):
            parent = content_key(parent, ev.token_ids[i * bs:(i + 1) * bs], extras[i])
            r.by_vllm_hash[h] = parent
            r.held.add(parent)

    # ------------------------------------------------------------------ questions
    def cached_tokens(self, replica: str, prompt: PromptKeys) -> int:
        """How many leading tokens of ``prompt`` the replica's engine would not recompute: its
        held blocks from the start, and never the prompt's last token (vLLM always computes
        it to get the first output token's logits)."""
        with self._lock:
            r = self._replicas.get(replica)
            if r is None or r.block_size is None or r.multi_group or not r.held:
                return 0
            bs = r.block_size
            matched = 0
            for key in prompt.keys(bs):
                if key not in r.held:
                    break
                matched += 1
        usable = (len(prompt) - 1) // bs if len(prompt) else 0
        return min(matched, usable) * bs

    def blocks(self, replica: Optional[str] = None) -> int:
        """Blocks indexed for one replica, or for all."""
        with self._lock:
            if replica is not None:
                r = self._replicas.get(replica)
                return len(r.held) if r else 0
            return sum(len(r.held) for r in self._replicas.values())

    def replicas(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def resets(self, replica: str) -> int:
        with self._lock:
            r = self._replicas.get(replica)
            return r.resets if r else 0
