"""Subscribes to each engine replica's KV cache events and feeds them to the prefix index.

Each engine publishes with vLLM's ZMQ publisher (``kv_events_config``, engine/server.py): a
PUB socket sends ``(topic, sequence, payload)`` per engine step that changed its cache, the
sequence an 8-byte big-endian count from 0 per engine run, the payload a msgpack
``KVEventBatch``; a ROUTER socket replays the last batches it kept from a sequence a
subscriber asks for (up to ``buffer_steps``, 10 000 steps by default). A replica's load report
names both endpoints and its topic
(``kv_events``); the topic names the engine run, so a new run (another endpoint and topic)
starts a new subscription and an empty entry in the index.

What a subscription does with the sequence: a batch that follows the last one is applied; one
that skips ahead asks the replay socket for the missing ones first; a new subscription first
asks it for everything from 0 (what the engine cached before the router subscribed: a ZMQ
subscriber misses whatever was sent before it connected). Whatever replay cannot supply, the index treats as a gap: it forgets the replica and
starts again from there (router/prefix_index.py: never a wrong match). A batch that cannot be
decoded is a gap too.

The wire format is vLLM's (``vllm.distributed.kv_events``; listed in
kv_transfer/vllm_internals.py).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Optional

from pdserve.router.prefix_index import PrefixIndex

logger = logging.getLogger("pdserve.router")

END_SEQ = -1  # the replay socket's end-of-replay marker (signed)


@dataclass(frozen=True)
class EventSource:
    """Where one engine run publishes: from its load report's ``kv_events``."""

    endpoint: str
    topic: str
    replay_endpoint: Optional[str] = None

    @classmethod
    def from_report(cls, report: Any) -> Optional["EventSource"]:
        if not isinstance(report, dict) or not report.get("endpoint") or report.get("topic") is None:
            return None
        return cls(str(report["endpoint"]), str(report["topic"]), report.get("replay_endpoint") or None)


def _decoder():
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    return msgspec.msgpack.Decoder(type=KVEventBatch)


class Subscription:
    """One replica's event stream into the index, as an asyncio task."""

    def __init__(self, replica: str, source: EventSource, index: PrefixIndex, replay_timeout_s: float) -> None:
        self.replica = replica
        self.source = source
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.batches = 0
        self.replayed = 0
        self._decode = _decoder()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.replica}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        topic = self.source.topic.encode()
        try:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(self.source.endpoint)
            if self.source.replay_endpoint:
                await self._replay(0)  # what the engine cached before this subscription
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3 or frames[0] != topic:
                    continue  # ZMQ subscriptions match prefixes: another run's longer topic
                seq = int.from_bytes(frames[1], "big", signed=True)
                expected = self.index.expected_seq(self.replica)
                if expected is not None and seq < expected:
                    continue  # already applied from a replay
                if seq != (expected or 0) and self.source.replay_endpoint:
                    await self._replay(expected or 0, seq)
                    if (self.index.expected_seq(self.replica) or 0) > seq:
                        continue
                self._apply(seq, frames[2])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken subscription must not break the router
            logger.warning("KV events of replica %s: subscription ended: %r", self.replica, e)
            self.index.reset(self.replica)
        finally:
            sub.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = self._decode.decode(payload)
        except Exception as e:  # noqa: BLE001 - an undecodable batch is a lost batch
            logger.warning("KV events of replica %s: batch %d undecodable (%r): treated as lost", self.replica, seq, e)
            return
        self.index.apply(self.replica, seq, batch.events)
        self.batches += 1

    async def _replay(self, start: int, until: Optional[int] = None) -> None:
        """Applies the publisher's kept batches from ``start`` up to ``until`` (excluded; None: all)."""
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        try:
            dealer.connect(self.source.replay_endpoint)
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout_s)
                if len(frames) != 4:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return
                expected = self.index.expected_seq(self.replica)
                if start <= seq and (until is None or seq < until) and (expected is None or seq >= expected):
                    self._apply(seq, frames[3])
                    self.replayed += 1
        except (asyncio.TimeoutError, TimeoutError):
            logger.info("KV events of replica %s: replay from %d timed out", self.replica, start)
        finally:
            dealer.close(linger=0)


class KVEventFeed:
    """The subscriptions of every replica that publishes, kept in step with the load polls."""

    def __init__(self, index: PrefixIndex, replay_timeout_s: float = 1.0) -> None:
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.subscriptions: dict[str, Subscription] = {}

    def follow(self, reports: dict[str, Any]) -> None:
        """``reports``: replica id -> its load report's ``kv_events`` (None if it publishes
        none). Starts a subscription for each new engine run, ends those of runs gone."""
        for replica, report in reports.items():
            source = EventSource.from_report(report)
            sub = self.subscriptions.get(replica)
            if sub is not None and sub.source == source:
                continue
            if sub is not None:
                sub.stop()
                del self.subscriptions[replica]
            self.index.reset(replica)
            if source is not None:
                sub = Subscription(replica, source, self.index, self.replay_timeout_s)
                self.subscriptions[replica] = sub
                sub.start()
        for replica in set(self.subscriptions) - set(reports):
            self.subscriptions.pop(replica).stop()
        for replica in set(self.index.replicas()) - set(reports):
            self.index.drop(replica)

    def close(self) -> None:
        for sub in self.subscriptions.values():
            sub.stop()
        self.subscriptions.clear()
