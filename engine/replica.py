"""The body shared by prefill, decode and monolithic Ray Serve replicas.

A replica owns one ``EngineServer``. Its core set and NIXL side-channel port come from
its rank on the node, so replicas of one pool never share cores or ports.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any, AsyncIterator, Optional

from ray import serve

from pdserve.engine.direct_stream import StreamServer
from pdserve.engine.little_meter import LittleMeter
from pdserve.engine.server import EngineServer, Role, advertised_address
from pdserve.settings.cluster import ClusterConfig

logger = logging.getLogger("pdserve.replica")


async def coalesce(source: AsyncIterator[tuple]) -> AsyncIterator[list]:
    """Re-yield ``source`` as lists of everything that is ready; never waits to fill one."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump():
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as e:  # handed to the consumer, which re-raises it
            queue.put_nowait(e)
        finally:
            queue.put_nowait(done)

    task = asyncio.create_task(pump())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = batch[-1] is done
            if finished:
                batch.pop()
            for x in batch:
                if isinstance(x, BaseException):
                    raise x
            if batch:
                yield batch
            if finished:
                return
    finally:
        # Cancelled by a client disconnect: stopping the source aborts the engine request.
        task.cancel()


class EngineReplica:
    role: Role

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ClusterConfig.model_validate(config)
        # Before the engine loads: an address other hosts cannot reach fails the replica now.
        host = advertised_address()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        rank = ctx.rank
        local_rank = getattr(rank, "local_rank", rank if isinstance(rank, int) else 0)
        self.server = EngineServer(self.cfg, self.role, int(local_rank), run_id=self.replica_id, host=host)
        scaling = self.cfg.pools()[self.role].autoscaling
        self.meter = LittleMeter(scaling.window_s if scaling else 10.0)
        await self.server.start()
        # The router reads each call's items over this connection; Ray carries the control plane.
        self.streams = StreamServer(self.generate, host, report=self.load)
        await self.streams.start()

    async def generate(self, endpoint: str, body: dict[str, Any], replica: Optional[str] = None) -> AsyncIterator[list]:
        """Stream lists of ``Item`` tuples (see engine/server.py); the first list starts
        with a ``("meta", {...})`` item naming this replica.

        Items that are ready together travel in one list: every message through Ray
        costs CPU in three processes, and on a small machine that CPU comes out of the
        engines' cores.
        """
        meta = ("meta", {"replica": self.replica_id, "role": self.role})
        first = True
        token = self.meter.start()
        try:
            async for batch in coalesce(self.server.handle(endpoint, body)):
                if first:
                    batch.insert(0, meta)
                    first = False
                yield batch
        finally:
            self.meter.finish(token)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook: λ and W for the pool's Little's-Law policy."""
        return self.meter.stats()

    def load(self, replica: Optional[str] = None) -> dict[str, Any]:
        report = self.server.load()
        report["replica"] = self.replica_id
        report["stream"] = self.streams.address()
        return report

    def set_kv_faults(self, spec: Optional[dict[str, Any]], replica: Optional[str] = None) -> dict[str, Any]:
        return {**self.server.set_kv_faults(spec), "replica": self.replica_id}

    def kv_faults(self, replica: Optional[str] = None) -> dict[str, Any]:
        return {**self.server.kv_faults(), "replica": self.replica_id}

    def kill(self, replica: Optional[str] = None) -> None:
        """Chaos: die like a crashed process (SIGKILL, no cleanup); Ray Serve replaces the replica."""
        os.kill(os.getpid(), signal.SIGKILL)

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self):
        # Ray Serve drains only the calls it carried; direct streams get the same grace.
        await self.streams.close(drain_timeout_s=self.cfg.router.stream_drain_timeout_s)
        await self.server.shutdown()
