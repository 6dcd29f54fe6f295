"""The body shared by prefill, decode and monolithic Ray Serve replicas.

A replica owns one ``EngineServer``. Its core set and NIXL side-channel port come from
its rank on the node, so replicas of one pool never share cores or ports.
"""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional

from ray import serve

from pdserve.engine.config import ClusterConfig
from pdserve.engine.server import EngineServer, Role

logger = logging.getLogger("pdserve.replica")


class EngineReplica:
    role: Role

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ClusterConfig.model_validate(config)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        rank = ctx.rank
        local_rank = getattr(rank, "local_rank", rank if isinstance(rank, int) else 0)
        self.server = EngineServer(self.cfg, self.role, int(local_rank))
        await self.server.start()

    async def generate(self, endpoint: str, body: dict[str, Any], replica: Optional[str] = None) -> AsyncIterator[tuple]:
        """Stream ``Item`` tuples (see engine/server.py), led by a ``("meta", {...})`` item."""
        yield ("meta", {"replica": self.replica_id, "role": self.role})
        async for item in self.server.handle(endpoint, body):
            yield item

    def load(self, replica: Optional[str] = None) -> dict[str, Any]:
        report = self.server.load()
        report["replica"] = self.replica_id
        return report

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self):
        await self.server.shutdown()
