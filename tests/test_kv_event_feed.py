"""The KV event subscription (router/kv_event_feed.py) against a publisher that speaks vLLM's
ZMQ protocol (PUB frames ``(topic, 8-byte sequence, msgpack KVEventBatch)``, a ROUTER that
replays kept batches), written here so the test decides which batches are lost and which the
replay buffer still holds. No engine."""
from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from pdserve.router.kv_event_feed import KVEventFeed
from pdserve.router.prefix_index import PrefixIndex, PromptKeys

kv_events = pytest.importorskip("vllm.distributed.kv_events")
BS = 4
TOPIC = "pdserve-kv/r/1"


def block(seed: int) -> list[int]:
    return [seed * 10 + i for i in range(BS)]


def payload(seed: int) -> bytes:
    """A batch storing one first block of tokens ``block(seed)`` (vLLM hash: seed)."""
    ev = kv_events.BlockStored(block_hashes=[seed], parent_block_hash=None, token_ids=block(seed), block_size=BS,
                               lora_id=None, medium="GPU", lora_name=None)
    return msgspec.msgpack.encode(kv_events.KVEventBatch(ts=0.0, events=[ev]))


def has(index: PrefixIndex, seed: int) -> bool:
    return index.cached_tokens("r", PromptKeys(block(seed) + [1])) == BS


class Publisher:
    """vLLM's publisher protocol, with a replay buffer the test fills as it likes."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub.bind("tcp://127.0.0.1:0")
        self.router.bind("tcp://127.0.0.1:0")
        self.kept: dict[int, bytes] = {}
        self.replays: list[int] = []
        self._task = asyncio.ensure_future(self._serve_replay())

    def source(self) -> dict:
        return {"endpoint": self.pub.getsockopt_string(zmq.LAST_ENDPOINT), "topic": TOPIC,
                "replay_endpoint": self.router.getsockopt_string(zmq.LAST_ENDPOINT)}

    async def send(self, seq: int, seed: int, lost: bool = False, keep: bool = True) -> None:
        data = payload(seed)
        if keep:
            self.kept[seq] = data
        if not lost:
            await self.pub.send_multipart((TOPIC.encode(), seq.to_bytes(8, "big"), data))

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.replays.append(start_seq)
            for seq in sorted(self.kept):
                if seq >= start_seq:
                    await self.router.send_multipart((client, b"", TOPIC.encode(), seq.to_bytes(8, "big"),
                                                      self.kept[seq]))
            await self.router.send_multipart((client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))

    def close(self) -> None:
        self._task.cancel()
        self.pub.close(linger=0)
        self.router.close(linger=0)


async def until(check, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.025)
    pytest.fail(f"never happened: {what}")


def test_a_subscription_replays_the_past_fills_gaps_from_replay_and_resets_when_it_cannot():
    async def scenario():
        pub, index = Publisher(), PrefixIndex()
        feed = KVEventFeed(index)
        try:
            await pub.send(0, seed=1, lost=True)  # before the router subscribed
            feed.follow({"r": pub.source()})
            await until(lambda: has(index, 1), "the batch sent before subscribing, by replay")
            assert pub.replays == [0]
            # the SUB socket connects in the background: send until it hears live batches
            seq = 1
            while not has(index, 100 + seq - 1):
                await pub.send(seq, seed=100 + seq)
                seq += 1
                await asyncio.sleep(0.05)
            # a lost batch the publisher still keeps: replayed before the next one is applied
            await pub.send(seq, seed=2, lost=True)
            await pub.send(seq + 1, seed=3)
            await until(lambda: has(index, 3), "the batch after the gap")
            assert has(index, 2) and has(index, 1) and index.resets("r") == 0
            assert pub.replays[-1] == seq
            # a lost batch the publisher no longer keeps: the replica starts over from the next one
            await pub.send(seq + 2, seed=4, lost=True, keep=False)
            await pub.send(seq + 3, seed=5)
            await until(lambda: has(index, 5), "the batch after the unrecoverable gap")
            assert index.resets("r") == 1 and not has(index, 1) and not has(index, 3)
            # the replica leaves its pool
            feed.follow({})
            assert "r" not in feed.subscriptions and index.replicas() == []
        finally:
            feed.close()
            pub.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_new_engine_run_is_a_new_subscription_with_an_empty_entry():
    async def scenario():
        old, new, index = Publisher(), Publisher(), PrefixIndex()
        feed = KVEventFeed(index)
        try:
            await old.send(0, seed=1, lost=True)
            feed.follow({"r": old.source()})
            await until(lambda: has(index, 1), "the old run's block")
            feed.follow({"r": {**new.source(), "topic": TOPIC}})  # same replica, another endpoint
            assert not has(index, 1)
            feed.follow({"r": None})  # an engine that publishes nothing
            assert "r" not in feed.subscriptions and not has(index, 1)
        finally:
            feed.close()
            old.close()
            new.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
