"""The prefix index (router/prefix_index.py) on vLLM's own event classes, sent through vLLM's
wire encoding (msgpack, as the engine's ZMQ publisher sends them), without an engine."""
from __future__ import annotations

import msgspec
import pytest

from pdserve.router.prefix_index import PrefixIndex, PromptKeys

kv_events = pytest.importorskip("vllm.distributed.kv_events")
BS = 4


def wire(*events):
    """The events as a subscriber decodes them: vLLM's KVEventBatch through msgpack."""
    raw = msgspec.msgpack.encode(kv_events.KVEventBatch(ts=0.0, events=list(events)))
    return msgspec.msgpack.decode(raw, type=kv_events.KVEventBatch).events


def stored(tokens, hashes, parent=None, salt=None, group=0, medium="GPU", block_size=BS):
    extra = [(salt,) if salt and parent is None and i == 0 else None for i in range(len(hashes))]
    return kv_events.BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                                 block_size=block_size, lora_id=None, medium=medium, lora_name=None,
                                 extra_keys=extra if any(extra) else None, group_idx=group)


def removed(*hashes, medium="GPU"):
    return kv_events.BlockRemoved(block_hashes=list(hashes), medium=medium, group_idx=0)


PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks of 4, one token over


def served(index, replica, seq=0, salt=None, prompt=PROMPT, base=1000):
    """What an engine publishes after computing ``prompt``: its full blocks, in one event."""
    full = len(prompt) // BS
    index.apply(replica, seq, wire(stored(prompt[:full * BS], [base + i for i in range(full)], salt=salt)))


def test_a_served_prompt_matches_on_its_replica_only():
    index = PrefixIndex()
    served(index, "r1")
    assert index.cached_tokens("r1", PromptKeys(PROMPT)) == 12
    assert index.cached_tokens("r2", PromptKeys(PROMPT)) == 0
    longer = PROMPT + [7, 8, 9, 10, 11]  # the next turn of the conversation
    assert index.cached_tokens("r1", PromptKeys(longer)) == 12
    assert index.cached_tokens("r1", PromptKeys([1] + PROMPT[1:])) == 0  # first block differs
    assert index.cached_tokens("r1", PromptKeys(PROMPT[:4] + [0] + PROMPT[5:])) == 4  # second differs
    assert index.blocks("r1") == 3 and index.blocks() == 3


def test_the_last_prompt_token_is_never_counted_cached():
    index = PrefixIndex()
    served(index, "r1", prompt=PROMPT[:12])
    # vLLM recomputes a prompt's last token, so an exact 12-token repeat reuses two blocks, not three
    assert index.cached_tokens("r1", PromptKeys(PROMPT[:12])) == 8
    assert index.cached_tokens("r1", PromptKeys(PROMPT[:13])) == 12


def test_children_chain_on_their_parents_vllm_hash():
    index = PrefixIndex()
    index.apply("r", 0, wire(stored(PROMPT[:4], [1])))
    index.apply("r", 1, wire(stored(PROMPT[4:12], [2, 3], parent=1)))
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 12
    # a block whose parent the index never saw cannot be reached from a prompt's start
    index.apply("r", 2, wire(stored([5, 5, 5, 5], [9], parent=777)))
    assert index.blocks("r") == 3


def test_eviction_removes_the_match_from_the_evicted_block_on():
    index = PrefixIndex()
    served(index, "r")
    index.apply("r", 1, wire(removed(1001)))  # the second block
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 4
    index.apply("r", 2, wire(removed(1000)))
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0
    index.apply("r", 3, wire(removed(555)))  # an unknown block: nothing to do


def test_all_blocks_cleared_empties_the_replica():
    index = PrefixIndex()
    served(index, "r")
    index.apply("r", 1, wire(kv_events.AllBlocksCleared()))
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0 and index.blocks("r") == 0


def test_tenants_salts_never_match_each_other_or_unsalted_prompts():
    index = PrefixIndex()
    served(index, "r", salt="tenant-a")
    assert index.cached_tokens("r", PromptKeys(PROMPT, "tenant-a")) == 12
    assert index.cached_tokens("r", PromptKeys(PROMPT, "tenant-b")) == 0
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0
    served(index, "r2")  # unsalted blocks do not serve a salted prompt either
    assert index.cached_tokens("r2", PromptKeys(PROMPT, "tenant-a")) == 0


def test_a_sequence_gap_clears_the_replica_until_new_events():
    index = PrefixIndex()
    served(index, "r", seq=0)
    index.apply("r", 2, wire())  # batch 1 was lost: it may have evicted anything
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0 and index.resets("r") == 1
    served(index, "r", seq=3)  # what the engine stores from then on is known again
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 12
    # a removal of a block stored before the gap is harmless: it was forgotten
    index.apply("r", 4, wire(removed(4242)))
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 12


def test_a_restarted_publisher_starts_empty():
    index = PrefixIndex()
    served(index, "r", seq=5)
    index.apply("r", 6, wire())
    index.apply("r", 0, wire())  # numbering went back to 0: a new engine run
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0
    served(index, "r2", seq=3)
    index.reset("r2")  # a new subscription (another engine run at another endpoint)
    assert index.cached_tokens("r2", PromptKeys(PROMPT)) == 0 and index.expected_seq("r2") is None


def test_other_groups_and_media_never_produce_matches():
    index = PrefixIndex()
    served(index, "r")
    index.apply("r", 1, wire(stored(PROMPT[:4], [50], group=1)))  # a hybrid model's second group
    assert index.cached_tokens("r", PromptKeys(PROMPT)) == 0
    index.apply("cpu", 0, wire(stored(PROMPT[:12], [1, 2, 3], medium="CPU")))  # an offload tier
    assert index.cached_tokens("cpu", PromptKeys(PROMPT)) == 0


def test_partial_blocks_are_not_indexed():
    index = PrefixIndex()
    served(index, "r")
    index.apply("r", 1, wire(stored(PROMPT[:2], [77], block_size=2)))
    assert index.blocks("r") == 3


def test_keys_agree_with_vllms_own_extra_keys():
    """The salt reaches the index as vLLM publishes it (to_event_extra_keys), and the prompt's
    keys are built from the same shape."""
    from vllm.v1.core.kv_cache_utils import to_event_extra_keys

    published = to_event_extra_keys([(("cache_salt", "s"),), None, None])
    ev = kv_events.BlockStored(block_hashes=[1, 2, 3], parent_block_hash=None, token_ids=PROMPT[:12],
                               block_size=BS, lora_id=None, medium="GPU", lora_name=None, extra_keys=published)
    index = PrefixIndex()
    index.apply("r", 0, wire(ev))
    assert index.cached_tokens("r", PromptKeys(PROMPT, "s")) == 12
