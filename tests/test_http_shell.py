"""The HTTP shell (router/http_app.py) and the admin API over a router core with in-memory
pools, in-process (httpx's ASGI transport): no socket, no Ray, no tokenizer."""
from __future__ import annotations

import httpx
from router_fakes import CHAT, MemoryCluster, MemoryEngine, run

from pdserve.router.http_app import build_http_app


def _cluster(admin_key: str | None = None) -> MemoryCluster:
    c = MemoryCluster("pd")
    if admin_key:
        c.cfg = c.cfg.model_copy(update={"admin": c.cfg.admin.model_copy(update={"key": admin_key})})
    c.add("prefill", MemoryEngine("prefill", "p0"))
    c.add("decode", MemoryEngine("decode", "d0"))
    c.build()
    return c


async def _calls(c: MemoryCluster, calls):
    transport = httpx.ASGITransport(app=build_http_app(c.router))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
        return [await http.request(method, path, **kw) for method, path, kw in calls]


def test_routes_answer_over_the_pipeline():
    c = _cluster()
    models, health, chat, metrics, status = run(_calls(c, [
        ("GET", "/v1/models", {}), ("GET", "/health", {}), ("POST", "/v1/chat/completions", {"json": CHAT}),
        ("GET", "/metrics", {}), ("GET", "/pdserve/status", {})]))
    assert models.json()["data"][0]["id"] == "tiny"
    assert health.json() == {"status": "ok", "mode": "pd"}
    assert chat.status_code == 200 and chat.headers["x-pdserve-path"] == "pd"
    assert 'pdserve_requests_total{endpoint="chat",path="pd",status="200"} 1.0' in metrics.text
    body = status.json()
    assert body["mode"] == "pd" and {r["replica"] for r in body["pools"]["decode"]} == {"d0"}
    assert body["links"] == [{"prefill": "p0", "decode": "d0", "state": "closed"}]


def test_health_names_a_pool_without_a_healthy_replica():
    c = _cluster()
    c.state("d0").healthy = False
    health, = run(_calls(c, [("GET", "/health", {})]))
    assert health.status_code == 503 and health.json()["pools_without_healthy_replica"] == ["decode"]


def test_admin_routes_are_guarded_and_act_on_the_router():
    c = _cluster(admin_key="test-admin-key-0123")
    key = {"x-pdserve-admin-key": c.router.admin_key}
    denied, ladder, ladder_show, bad, ab, ab_show, chaos = run(_calls(c, [
        ("POST", "/admin/ladder", {"json": {"rung": 2}}),
        ("POST", "/admin/ladder", {"json": {"rung": 2}, "headers": key}),
        ("GET", "/admin/ladder", {"headers": key}),
        ("POST", "/admin/ab", {"json": {"fraction": 1}, "headers": key}),
        ("POST", "/admin/ab", {"json": {"monolithic_fraction": 0.5}, "headers": key}),
        ("GET", "/admin/ab", {"headers": key}),
        ("GET", "/admin/chaos", {"headers": key})]))
    assert denied.status_code == 401
    assert ladder.status_code == 200 and c.router.admission.ladder.current == 2
    assert ladder_show.json() == ladder.json()
    assert bad.status_code == 400 and "monolithic_fraction" in bad.json()["error"]["message"]
    assert ab.status_code == 200 and c.router.split.fraction == 0.5 and ab_show.json() == ab.json()
    assert chaos.json()["links"] == [] and chaos.status_code == 200


def test_without_an_admin_key_the_admin_api_is_off():
    c = _cluster()
    r, = run(_calls(c, [("GET", "/admin/ab", {})]))
    assert r.status_code == 403
