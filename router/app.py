"""The router's Ray Serve replica: a thin shell around the router pipeline.

It builds the router (router/core.py: pools, admission, breakers, metrics and the stages
of router/pipeline.py), binds the HTTP socket, starts the load poller, and serves the HTTP
app (router/http_app.py) itself: no Ray Serve proxy in front, since on a small machine
every hop a token takes costs CPU that the engines need.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from pdserve.router.core import Router
from pdserve.router.http_app import bind_http_socket, build_http_app, serve_http
from pdserve.router.pools import Pool
from pdserve.settings.cluster import ClusterConfig

# The core's parts a RouterServer exposes as its own attributes (the admin API and tests use them).
_SHARED = ("cfg", "mode", "pools", "checker", "metrics", "tenants", "admission", "goodput", "split", "breakers",
           "admin_key", "prefill_pick", "decode_pick", "kv_bytes_per_token")


class RouterServer:
    """The router replica: HTTP, the load poller, and the router they serve."""

    async def __init__(self, config: dict[str, Any], prefill=None, decode=None, monolithic=None) -> None:
        cfg = ClusterConfig.model_validate(config)
        direct = cfg.router.token_stream == "direct"
        handles = (("prefill", prefill), ("decode", decode), ("monolithic", monolithic))
        self._setup(cfg, {name: Pool(name, h, direct_streams=direct) for name, h in handles if h is not None})
        sock = bind_http_socket(self.cfg.router.host, self.cfg.router.port)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        await self._refresh()
        self._http = asyncio.get_running_loop().create_task(serve_http(build_http_app(self), sock))

    def _setup(self, cfg: ClusterConfig, pools: dict[str, Pool], core: Optional[Router] = None) -> None:
        """Everything but the HTTP socket and the load poller (tests build a router from this)."""
        self.core = core or Router.from_config(cfg, pools)
        for name in _SHARED:
            setattr(self, name, getattr(self.core, name))

    async def check_health(self) -> None:
        if self._http.done():
            raise RuntimeError(f"HTTP server stopped: {self._http.exception()!r}")

    async def _refresh(self) -> None:
        await self.core.poller.refresh()

    async def _poll_forever(self) -> None:
        await self.core.poller.poll_forever()
