"""Tenants, admission and the degradation ladder against the real cluster (the 'tenants' app).

Game-day tests force each rung through the admin API (and the CLI) and check what each class
gets; the load test pushes three tenants past the cluster's knee.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from pdserve.router.config import DEV_ADMIN_KEY
from tests.conftest import RESTRICTED_KEY
from tests.helpers import TIMEOUT, chat_body, metric_samples, post, status

pytestmark = pytest.mark.cluster

KEYS = {"critical": "demo-critical", "standard": "demo-standard", "sheddable": "demo-sheddable"}
ADMIN = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}


def auth(cls: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[cls]}"}


def set_rung(url: str, rung) -> dict:
    body = {"auto": True} if rung == "auto" else {"rung": rung}
    r = post(url, "/admin/ladder", body, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def url(clusters):
    yield clusters.tenants_base
    set_rung(clusters.tenants_base, 0)
    set_rung(clusters.tenants_base, "auto")


def ask(url: str, cls: str, max_tokens: int = 24, content: str = "game day", headers=None) -> httpx.Response:
    return post(url, "/v1/chat/completions", chat_body(content, max_tokens=max_tokens),
                headers=headers if headers is not None else auth(cls))


def assert_error(r: httpx.Response, status: int, retry_after: bool) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    assert ("retry-after" in r.headers) == retry_after, dict(r.headers)
    if retry_after:
        assert int(r.headers["retry-after"]) >= 1


# ---------------------------------------------------------------- authentication
def test_missing_or_bad_key_is_401(url):
    assert_error(ask(url, "", headers={}), 401, retry_after=False)
    assert_error(ask(url, "", headers={"Authorization": "Bearer not-a-key"}), 401, retry_after=False)
    assert_error(ask(url, "", headers={"Authorization": "Basic demo-critical"}), 401, retry_after=False)


def test_model_the_tenant_may_not_use_is_403(url):
    r = ask(url, "", headers={"Authorization": f"Bearer {RESTRICTED_KEY}"})
    assert_error(r, 403, retry_after=False)
    assert r.json()["error"]["param"] == "model"


def test_oversize_for_the_tenant_is_400_before_engine_work(url):
    before = status(url)["pools"]["prefill"][0]["kv_cache_usage"]
    # sheddable's max_context is 1024 tokens: 1100 max_tokens cannot fit, whatever the prompt
    r = ask(url, "sheddable", max_tokens=1100)
    assert_error(r, 400, retry_after=False)
    assert "1024" in r.json()["error"]["message"]
    assert status(url)["pools"]["prefill"][0]["kv_cache_usage"] <= before


def test_each_class_is_served_and_labelled(url):
    for cls in KEYS:
        r = ask(url, cls)
        assert r.status_code == 200, r.text
        assert r.headers["x-pdserve-class"] == cls and r.headers["x-pdserve-path"] == "pd"
        assert r.json()["usage"]["completion_tokens"] == 24


# ---------------------------------------------------------------- game days: force each rung
def test_rung_1_stops_sheddable(url):
    assert set_rung(url, 1)["forced"] is True
    assert_error(ask(url, "sheddable"), 429, retry_after=True)
    for cls in ("standard", "critical"):
        r = ask(url, cls, max_tokens=100)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100


def test_rung_2_caps_standard_max_tokens(url, clusters):
    cap = clusters.tenants_cfg.ladder.standard_max_tokens_cap
    set_rung(url, 2)
    r = ask(url, "standard", max_tokens=100)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == cap
    assert "max-tokens-capped" in r.headers["x-pdserve-degraded"] and f"to={cap}" in r.headers["x-pdserve-degraded"]
    r = ask(url, "critical", max_tokens=100)
    assert r.json()["usage"]["completion_tokens"] == 100 and "x-pdserve-degraded" not in r.headers
    assert_error(ask(url, "sheddable"), 429, retry_after=True)


def test_rung_3_sends_standard_to_the_degraded_target(url):
    prompt = "the degraded target answers the same"
    set_rung(url, 0)
    reference = ask(url, "critical", max_tokens=32, content=prompt)
    set_rung(url, 3)
    r = ask(url, "standard", max_tokens=32, content=prompt)
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-degraded"].startswith("degraded-target=prefill")
    assert r.headers["x-pdserve-path"] == "monolithic"
    # served whole by the prefill pool: the same greedy answer as P/D
    assert r.json()["choices"][0]["message"]["content"] == reference.json()["choices"][0]["message"]["content"]
    c = ask(url, "critical", max_tokens=32, content=prompt)
    assert c.headers["x-pdserve-path"] == "pd" and "x-pdserve-degraded" not in c.headers


def test_rung_4_is_critical_only_via_the_cli(url, capsys):
    from pdserve.cluster.cli import main

    assert main(["admin", "--url", url, "ladder", "--set", "4"]) == 0
    assert '"rung": 4' in capsys.readouterr().out
    assert_error(ask(url, "standard"), 503, retry_after=True)
    assert_error(ask(url, "sheddable"), 429, retry_after=True)
    assert ask(url, "critical").status_code == 200
    assert main(["admin", "--url", url, "ladder", "--auto"]) == 0
    assert main(["admin", "--url", url, "ladder", "--set", "7"]) == 2
    assert "0 to 4" in capsys.readouterr().err


def test_ladder_admin_needs_the_admin_key(url):
    r = post(url, "/admin/ladder", {"rung": 2}, headers=auth("critical"))
    assert r.status_code == 401
    r = post(url, "/admin/ladder", {"rung": "high"}, headers=ADMIN)
    assert r.status_code == 400 and "rung" in r.json()["error"]["message"]


def test_rung_metrics_and_admission_counters(url):
    set_rung(url, 1)
    ask(url, "sheddable")
    text = httpx.get(url + "/metrics").text
    assert "pdserve_degradation_rung 1.0" in text
    assert 'pdserve_admission_total{class="sheddable",decision="rejected",reason="ladder"}' in text
    assert 'pdserve_tenant_tokens_total{kind="output",tenant="critical"}' in text


# ---------------------------------------------------------------- prefix-cache isolation
def test_prefix_cache_is_not_shared_across_tenants(url):
    prompt = f"{uuid.uuid4()} " + "isolation " * 300  # several KV blocks, never seen before
    first = ask(url, "critical", max_tokens=2, content=prompt)
    again = ask(url, "critical", max_tokens=2, content=prompt)
    other = ask(url, "standard", max_tokens=2, content=prompt)

    def cached(r):
        return ((r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")) or 0

    assert first.status_code == again.status_code == other.status_code == 200
    assert cached(again) > 0, again.json()["usage"]  # same tenant: its own cache hits
    assert cached(other) == 0, other.json()["usage"]  # another tenant: no hit on that prefix


# ---------------------------------------------------------------- load past the knee
async def _one(client: httpx.AsyncClient, url: str, cls: str, max_tokens: int, i: int) -> dict:
    body = chat_body(f"{cls} request {i}: " + "tell me more about the cluster " * 12, max_tokens=max_tokens,
                     stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    out = {"cls": cls, "status": None, "tokens": 0, "ttft": None, "retry_after": None, "done": False}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(cls)) as r:
        out["status"] = r.status_code
        out["retry_after"] = r.headers.get("retry-after")
        out["capped"] = r.headers.get("x-pdserve-degraded")
        async for line in r.aiter_lines():
            if line.startswith("data: [DONE]"):
                out["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                if out["ttft"] is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    out["ttft"] = time.perf_counter() - t0
    out["e2e"] = time.perf_counter() - t0
    return out


async def _tenant_load(url: str, cls: str, concurrency: int, total: int, max_tokens: int) -> list[dict]:
    results: list[dict] = []
    counter = iter(range(total))
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        async def worker():
            for i in counter:
                results.append(await _one(client, url, cls, max_tokens, i))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _watch_rungs(url: str, stop: asyncio.Event, seen: list[int]) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        while not stop.is_set():
            seen.append((await client.get(url + "/pdserve/status")).json()["ladder"]["rung"])
            await asyncio.sleep(0.2)


def _goodput_counts(url: str) -> dict[str, float]:
    samples = metric_samples(url)
    return {c: samples.get(f'pdserve_goodput_requests_total{{class="{c}"}}', 0.0)
            for c in ("critical", "standard", "sheddable")}


def test_three_tenants_past_the_knee(url, clusters):
    set_rung(url, "auto")
    cap = clusters.tenants_cfg.ladder.standard_max_tokens_cap
    good_before = _goodput_counts(url)

    async def scenario():
        stop = asyncio.Event()
        seen: list[int] = []
        watcher = asyncio.create_task(_watch_rungs(url, stop, seen))
        t0 = time.perf_counter()
        groups = await asyncio.gather(
            _tenant_load(url, "critical", 4, 32, 128),
            _tenant_load(url, "standard", 10, 60, 256),
            _tenant_load(url, "sheddable", 8, 60, 256))
        elapsed = time.perf_counter() - t0
        stop.set()
        await watcher
        return groups, seen, elapsed

    (crit, std, shed), seen, elapsed = asyncio.run(scenario())
    everything = crit + std + shed
    # nothing lost or left hanging: every request got a status, every 200 ran to [DONE] in full
    assert len(everything) == 32 + 60 + 60
    assert {r["status"] for r in everything} <= {200, 429, 503}, {r["status"] for r in everything}
    for r in everything:
        if r["status"] == 200:
            assert r["done"], r
            expected = cap if (r["cls"] == "standard" and r["capped"]) else (128 if r["cls"] == "critical" else 256)
            assert r["tokens"] == expected, r
        else:
            assert r["retry_after"] and int(r["retry_after"]) >= 1, r
    # Critical is never turned away; Sheddable is shed with 429s
    assert all(r["status"] == 200 for r in crit)
    assert sum(1 for r in shed if r["status"] == 429) > 0
    ok = [r for r in crit if r["ttft"] is not None]
    slo = clusters.tenants_cfg.slo.for_class("critical")
    good = sum(1 for r in ok if r["ttft"] * 1000 <= slo["ttft_ms"])
    ttfts = sorted(r["ttft"] for r in ok)
    # Goodput by the router's own counter (every SLO of the class met, TTFT from arrival at the
    # router), as a share of what each class sent. This client shares the two cores with the
    # router and engines, so its own clock would also count its own lag.
    good = {c: n - good_before[c] for c, n in _goodput_counts(url).items()}
    sent = {"critical": len(crit), "standard": len(std), "sheddable": len(shed)}
    share = {c: good[c] / sent[c] for c in sent}
    ttfts = sorted(r["ttft"] for r in crit if r["ttft"] is not None)
    print(f"\ngoodput over {elapsed:.1f} s (met every SLO / sent): "
          + ", ".join(f"{c} {good[c]:.0f}/{sent[c]} ({good[c] / elapsed:.2f} req/s)" for c in sent)
          + f"; critical TTFT p50 {ttfts[len(ttfts) // 2] * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms;"
          f" standard 200/503: {sum(r['status'] == 200 for r in std)}/{sum(r['status'] == 503 for r in std)};"
          f" sheddable 200/429: {sum(r['status'] == 200 for r in shed)}/{sum(r['status'] == 429 for r in shed)};"
          f" rungs seen {sorted(set(seen))}")
    # Past the knee, admission protects Critical: it keeps goodput, and a larger share of its
    # requests meets its (tighter) SLOs than of Sheddable's, which is shed first.
    assert good["critical"] > 0, good
    assert share["critical"] > share["sheddable"], share
    assert max(seen) >= 1, "the load never moved the ladder"
    # once the load stops the ladder steps down, one rung per stable interval, to 0
    deadline = time.time() + 5 * clusters.tenants_cfg.ladder.stable_interval_s + 15
    rungs = []
    while time.time() < deadline:
        rungs.append(status(url)["ladder"]["rung"])
        if rungs[-1] == 0:
            break
        time.sleep(0.5)
    assert rungs[-1] == 0, rungs
    assert all(b >= a - 1 for a, b in zip(rungs, rungs[1:])), rungs  # never more than one rung at a time
    # and no KV is stranded: both pools drain to zero
    deadline = time.time() + 30
    while time.time() < deadline:
        st = status(url)
        used = [r["kv_cache_usage"] for p in ("prefill", "decode") for r in st["pools"][p]]
        if all(u == 0 for u in used) and st["admission"]["queued"] == 0 and not any(st["admission"]["inflight"].values()):
            break
        time.sleep(0.5)
    assert all(u == 0 for u in used), st
    assert st["admission"]["queued"] == 0 and not any(st["admission"]["inflight"].values()), st["admission"]
