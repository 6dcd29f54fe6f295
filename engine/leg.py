"""One engine call as its caller (the router) reads it: a ``Leg``.

A leg is a stream of item batches from one replica of a pool (engine/server.py's ``Item``
formats), read one item at a time. Side items are kept on the leg: ``("meta", ...)`` names
the replica that answered, ``("kv", ...)`` is a decode engine's report of its KV pull.

The pool watches the leg (``Pool.watch``): when its load polls mark the replica serving it
unhealthy, the pool calls ``lose()``, which ends the read the caller is waiting on. No
timer or syscall per item: the check runs once per load poll, not per token.

The pool is duck-typed (``name``, ``stream``, ``watch``, ``unwatch``, ``track``), so the
prefill and decode legs (prefill/, decode/) use legs without importing the router.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from pdserve.engine.direct_stream import DirectStream


class LegLost(ConnectionError):
    """The replica serving a leg was marked unhealthy while the router waited on it (its load
    polls timed out: the process hangs, or its host is partitioned and sends nothing, not
    even a reset). The leg is broken, like a stream cut: fallback before the first token,
    mid-stream resume after it."""


class Leg:
    """One engine call: its stream of items, the replica serving it, and cleanup."""

    def __init__(self, pool, replica_id: Optional[str], endpoint: str, body: dict[str, Any]):
        self.pool = pool
        self.replica_id = replica_id
        self.gen = pool.stream(replica_id, endpoint, body)
        self._direct = isinstance(self.gen, DirectStream)
        self.served_by: Optional[str] = None
        self.prefill_s: Optional[float] = None  # the P/D prefill leg that came before this decode leg
        self.kv_pull: Optional[dict[str, Any]] = None  # the decode engine's report of its KV pull
        self.link: Optional[tuple[str, str]] = None  # (prefill, decode) replicas of a P/D decode leg
        self.lost: Optional[str] = None  # why the pool gave this leg up
        self._wake: Optional[asyncio.Future] = None  # ends a Ray-streamed read on lose()
        self._buffer: list[tuple] = []
        pool.watch(self)

    def watched_replica(self) -> Optional[str]:
        """The replica whose health decides this leg's: the one that answered, else the one asked."""
        return self.served_by or self.replica_id

    def lose(self, why: str) -> None:
        """Give the leg up: the read waiting on it (or the next one) raises ``LegLost``."""
        if self.lost is None:
            self.lost = why
            self.cancel()  # a direct stream's pending read ends as its connection is aborted
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    async def next_item(self) -> Optional[tuple]:
        """The next response item, or None at the end of the stream; side items are kept on the leg."""
        while True:
            while self._buffer:
                item = self._buffer.pop(0)
                if item[0] == "meta":
                    self.served_by = item[1]["replica"]
                    continue
                if item[0] == "kv":
                    self.kv_pull = item[1]
                    continue
                return item
            try:
                if self._direct and self.lost is None:
                    batch = await self.gen.__anext__()  # lose() aborts the connection, which ends this read
                else:
                    batch = await self._read_raced()
                self._buffer = list(batch)
            except StopAsyncIteration:
                self.pool.unwatch(self)
                return None
            except Exception as e:
                if self.lost is not None:
                    raise LegLost(f"{self.pool.name} replica {self.watched_replica()} lost: {self.lost}") from e
                raise

    async def _read_raced(self) -> list:
        """A read of a leg given up, or of a Ray streaming call: Ray's cancel may wait on the
        lost replica, so the read is raced against lose()."""
        if self.lost is not None:
            raise ConnectionAbortedError("leg given up")
        self._wake = asyncio.get_running_loop().create_future()
        read = asyncio.ensure_future(self.gen.__anext__())
        try:
            await asyncio.wait({read, self._wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = not read.done()
            if pending:
                read.cancel()
        if pending:
            raise ConnectionAbortedError("leg given up")
        return read.result()

    def ready_chunks(self) -> list[str]:
        """SSE chunks that arrived with the last message, without waiting for more."""
        chunks = [it[1] for it in self._buffer if it[0] == "sse"]
        self._buffer = [it for it in self._buffer if it[0] != "sse"]
        return chunks

    def cancel(self) -> None:
        self.pool.unwatch(self)
        try:
            self.gen.cancel()
        except Exception:
            pass
