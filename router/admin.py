"""The admin API: chaos actions for game days and tests, behind the admin key.

    POST /admin/chaos/kill-links     every KV link refuses transfers
    POST /admin/chaos/heal-links     clears every injected fault
    POST /admin/chaos/faults         {"fail": 0.3, "delay_s": 1, "corrupt": 0.1, ...} (see kv_transfer/faults.py)
    POST /admin/chaos/kill-replica   {"pool": "prefill", "replica": "<id>"?}: SIGKILL a replica process
    GET  /admin/chaos                faults per engine and breaker state per link
    POST /admin/ladder               {"rung": N} forces a degradation rung (game days); {"auto": true} releases it
    GET  /admin/ladder               the rung, whether it is forced, and the KV signal behind it
    POST /admin/ab                   {"monolithic_fraction": F} sets the online A/B split (P/D clusters)
    GET  /admin/ab                   the split in force

Faults enter the transfer path inside the engines (the gRPC server and puller, NIXL's
read path), never the router's own logic, so what the router sees is what a real failure
looks like. Send the key as ``Authorization: Bearer <key>`` or ``x-pdserve-admin-key``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve.engine.errors import error_body
from pdserve.kv_transfer.faults import FaultSpec
from pdserve.router.config import DEV_ADMIN_KEY, is_loopback
from pdserve.router.targeting import TARGET_KWARG

if TYPE_CHECKING:
    from pdserve.router.core import Router as RouterServer

logger = logging.getLogger("pdserve.router")

KV_POOLS = ("prefill", "decode")
_CALL_TIMEOUT_S = 10.0


def _deny(status: int, message: str) -> JSONResponse:
    kind = "AuthenticationError" if status == 401 else "PermissionDeniedError"
    return JSONResponse(error_body(status, message, kind), status_code=status)


def check_admin(server: "RouterServer", request: Request) -> JSONResponse | None:
    key = server.admin_key
    if not key:
        return _deny(403, "the admin API is off: this cluster's config sets no admin key")
    given = request.headers.get("x-pdserve-admin-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        return _deny(401, "missing or wrong admin key")
    client = request.client.host if request.client else ""
    if key == DEV_ADMIN_KEY and not is_loopback(client):
        return _deny(403, "the development admin key is accepted from loopback clients only")
    return None


async def _call(pool, method: str, replica: str, *args) -> Any:
    handle = getattr(pool.handle, method)
    return await asyncio.wait_for(handle.remote(*args, **{TARGET_KWARG: replica}), _CALL_TIMEOUT_S)


async def set_faults_everywhere(server: "RouterServer", spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Applies ``spec`` to every engine of the KV pools; returns what each replica reports."""
    FaultSpec.from_dict(spec or {})  # refuse a bad spec before touching any engine
    results = []
    for name in KV_POOLS:
        pool = server.pools.get(name)
        if pool is None:
            continue
        for rid in list(pool.replicas):
            try:
                results.append(await _call(pool, "set_kv_faults", rid, spec))
            except Exception as e:  # noqa: BLE001 - report per replica, keep going
                results.append({"pool": name, "replica": rid, "error": repr(e)})
    return results


async def kill_replica(server: "RouterServer", pool_name: str, replica: str | None) -> dict[str, Any]:
    pool = server.pools.get(pool_name)
    if pool is None:
        raise ValueError(f"no pool {pool_name!r} in this cluster; pools: {sorted(server.pools)}")
    ids = list(pool.replicas)
    if replica is None:
        if not ids:
            raise ValueError(f"pool {pool_name!r} has no replica to kill")
        replica = ids[0]
    elif replica not in ids:
        raise ValueError(f"pool {pool_name!r} has no replica {replica!r}; replicas: {ids}")
    try:
        await _call(pool, "kill", replica)
    except Exception:  # the call dies with the process; that is the point
        pass
    logger.warning("chaos: killed %s replica %s", pool_name, replica)
    return {"pool": pool_name, "replica": replica, "killed": True}


async def _guarded(server: "RouterServer", request: Request, action) -> Any:
    """Runs ``action(body)`` for an admin caller; a bad body is a 400."""
    denied = check_admin(server, request)
    if denied is not None:
        return denied
    try:
        raw = await request.body()
        body = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return await action(body)
    except (ValueError, TypeError) as e:
        return JSONResponse(error_body(400, str(e), "BadRequestError"), status_code=400)


async def _show_chaos(server: "RouterServer") -> dict[str, Any]:
    engines = []
    for name in KV_POOLS:
        pool = server.pools.get(name)
        for rid in list(pool.replicas) if pool else []:
            try:
                engines.append(await _call(pool, "kv_faults", rid))
            except Exception as e:  # noqa: BLE001
                engines.append({"pool": name, "replica": rid, "error": repr(e)})
    links = [{"prefill": p, "decode": d, "state": st.value} for (p, d), st in server.breakers.states().items()]
    return {"engines": engines, "links": links}


def _chaos_routes(server: "RouterServer") -> list[tuple[str, str, Any]]:
    async def _faults(spec):
        return {"faults": spec or {}, "engines": await set_faults_everywhere(server, spec)}

    async def kill_links(request: Request):
        return await _guarded(server, request, lambda body: _faults({"kill_links": True}))

    async def heal_links(request: Request):
        return await _guarded(server, request, lambda body: _faults(None))

    async def faults(request: Request):
        return await _guarded(server, request, lambda body: _faults(body))

    async def kill(request: Request):
        async def act(body):
            unknown = set(body) - {"pool", "replica"}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}; expected 'pool' and optional 'replica'")
            if body.get("pool") not in server.pools:
                raise ValueError(f"'pool' must be one of {sorted(server.pools)}")
            return await kill_replica(server, body["pool"], body.get("replica"))

        return await _guarded(server, request, act)

    async def show(request: Request):
        return await _guarded(server, request, lambda body: _show_chaos(server))

    return [("/admin/chaos/kill-links", "POST", kill_links), ("/admin/chaos/heal-links", "POST", heal_links),
            ("/admin/chaos/faults", "POST", faults), ("/admin/chaos/kill-replica", "POST", kill),
            ("/admin/chaos", "GET", show)]


def _ladder_routes(server: "RouterServer") -> list[tuple[str, str, Any]]:
    async def ladder_set(request: Request):
        async def act(body):
            if set(body) == {"rung"} and isinstance(body["rung"], int) and not isinstance(body["rung"], bool):
                server.admission.ladder.force(body["rung"])
            elif body == {"auto": True}:
                server.admission.ladder.auto()
            else:
                raise ValueError('send {"rung": N} with N in 0..4, or {"auto": true}')
            server.metrics.rung.set(server.admission.ladder.current)
            logger.warning("admin: ladder now %s", server.admission.ladder.state())
            return server.admission.ladder.state()

        return await _guarded(server, request, act)

    async def ladder_show(request: Request):
        async def act(body):
            return server.admission.ladder.state()

        return await _guarded(server, request, act)

    return [("/admin/ladder", "POST", ladder_set), ("/admin/ladder", "GET", ladder_show)]


def _ab_routes(server: "RouterServer") -> list[tuple[str, str, Any]]:
    async def ab_set(request: Request):
        async def act(body):
            if set(body) != {"monolithic_fraction"}:
                raise ValueError('send {"monolithic_fraction": F} with F in [0, 1]')
            if server.mode != "pd":
                raise ValueError("the online A/B split needs a P/D cluster")
            server.split.set_fraction(body["monolithic_fraction"])
            logger.warning("admin: A/B split now %s", server.split.state())
            return server.split.state()

        return await _guarded(server, request, act)

    async def ab_show(request: Request):
        async def act(body):
            return server.split.state()

        return await _guarded(server, request, act)

    return [("/admin/ab", "POST", ab_set), ("/admin/ab", "GET", ab_show)]


def add_admin_routes(app: FastAPI, server: "RouterServer") -> None:
    for path, method, handler in (*_ab_routes(server), *_ladder_routes(server), *_chaos_routes(server)):
        app.add_api_route(path, handler, methods=[method])
