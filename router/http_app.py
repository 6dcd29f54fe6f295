"""The HTTP shell around the router pipeline: routes, the listening socket, uvicorn.

The router serves HTTP itself (no Ray Serve proxy in front): on a small machine every hop
a token takes costs CPU that the engines need.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdserve.router.admin import add_admin_routes

if TYPE_CHECKING:
    from pdserve.router.core import Router


def models_body(router: "Router") -> dict[str, Any]:
    m = router.cfg.model
    return {"object": "list", "data": [{
        "id": m.served_name, "object": "model", "created": 0, "owned_by": "pdserve",
        "root": m.path, "parent": None, "max_model_len": m.max_model_len,
    }]}


def health(router: "Router"):
    missing = [n for n, p in router.pools.items() if not any(s.healthy for s in p.replicas.values())]
    if missing:
        return JSONResponse({"status": "unhealthy", "pools_without_healthy_replica": missing}, status_code=503)
    return {"status": "ok", "mode": router.mode}


def prometheus_page(router: "Router") -> Response:
    for cls, rps in router.goodput.rates(time.monotonic()).items():
        router.metrics.goodput_rps.labels(cls).set(rps)
    return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def status_body(router: "Router") -> dict[str, Any]:
    adm = router.admission
    return {"name": router.cfg.name, "mode": router.mode, "transport": router.cfg.kv_transfer.transport,
            "pools": {n: p.status() for n, p in router.pools.items()},
            "links": [{"prefill": p, "decode": d, "state": st.value}
                      for (p, d), st in router.breakers.states().items()],
            "ladder": adm.ladder.state(),
            "ab_split": router.split.state(),
            "admission": {"capacity": adm.slots.capacity,
                          "inflight": dict(adm.slots.inflight),
                          "queued": adm.queue_depth()},
            "poll_errors": {n: p.last_error for n, p in router.pools.items() if p.last_error}}


def build_http_app(router) -> FastAPI:
    """The router's HTTP API over ``router`` (a core ``Router``, or a ``RouterServer`` around one)."""
    core: "Router" = getattr(router, "core", router)
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)

    async def chat_completions(request: Request):
        return await core.pipeline.serve("chat", request)

    async def completions(request: Request):
        return await core.pipeline.serve("completions", request)

    async def models():
        return models_body(core)

    async def get_health():
        return health(core)

    async def prometheus_metrics():
        return prometheus_page(core)

    async def status():
        return status_body(core)

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", get_health, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/pdserve/status", status, methods=["GET"])
    add_admin_routes(app, core)
    return app


def bind_http_socket(host: str, port: int):
    """Bind now, so a port in use fails the deployment with a clear error at startup.

    No SO_REUSEPORT: a second cluster on the same port must fail, not silently share it.
    """
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"router cannot listen on {host}:{port}: {e}") from e
    return sock


async def serve_http(app: FastAPI, sock) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    await uvicorn.Server(config).serve(sockets=[sock])
