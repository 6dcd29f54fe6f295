"""Chaos under load, for each KV transport: KV links are killed and healed again and again and
the prefill replica's process is killed, while 120 streamed chat requests run 8 at a time.

Every request must come back 200 with its full greedy output (equal to monolithic serving),
none lost; after healing, traffic returns to P/D and the prefill engine holds no KV.

Runs last (file name): it takes the prefill pools down until Ray Serve restarts them.
The long soak (more requests, more rounds) is `-m soak` (see README).
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import chat_body, post, status, stream_chat, wait_for

pytestmark = pytest.mark.cluster

ADMIN = {"Authorization": "Bearer pdserve-dev-admin"}
PROMPTS = [f"Chaos prompt {i}: " + " ".join(["link", "cache", "block", "stream"][(i + k) % 4] for k in range(8 + 9 * i))
           for i in range(16)]
MAX_TOKENS = 8


def _chaos_cli(url: str, action: str) -> None:
    from pdserve.cluster.cli import main

    assert main(["chaos", "--url", url, action]) == 0


def _streamed_tokens(url: str, body: dict) -> tuple[int, list[int], str, str | None]:
    r, chunks = stream_chat(url, body)
    tokens = [t for c in chunks if "choices" in c for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    done = bool(chunks) and chunks[-1] == {"done": True}
    return (r.status_code if done else -1), tokens, r.headers.get("x-pdserve-path"), \
        r.headers.get("x-pdserve-fallback-cause")



def run_chaos(url: str, mono_url: str, requests: int = 120, concurrency: int = 8, link_rounds: int = 3,
              lease_s: float = 30) -> Counter:
    expected = {p: post(mono_url, "/v1/chat/completions", chat_body(p, MAX_TOKENS)).json()["choices"][0]["token_ids"]
                for p in PROMPTS}
    (old_prefill,) = status(url)["pools"]["prefill"]
    done = [0]
    lock = threading.Lock()

    def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        result = _streamed_tokens(url, chat_body(prompt, MAX_TOKENS))
        with lock:
            done[0] += 1
        return prompt, result

    def wait_done(n: int):
        while done[0] < n:
            time.sleep(0.05)

    per_phase = requests // (2 * link_rounds + 2)

    def chaos():
        for k in range(link_rounds):
            wait_done((2 * k + 1) * per_phase)
            _chaos_cli(url, "kill-links")
            wait_done((2 * k + 2) * per_phase)
            _chaos_cli(url, "heal-links")
        wait_done((2 * link_rounds + 1) * per_phase)
        r = post(url, "/admin/chaos/kill-replica", {"pool": "prefill"}, headers=ADMIN)
        assert r.status_code == 200, r.text

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, range(requests)))
    chaos_thread.join()

    paths = Counter()
    for prompt, (code, tokens, path, cause) in results:
        assert code == 200, (prompt, code, path, cause)
        assert tokens == expected[prompt], (prompt, path, cause)
        paths[(path, cause)] += 1
    assert sum(paths.values()) == requests
    assert any(p == "fallback" and c in ("kv_transfer_failed", "link_circuit_open") for p, c in paths), paths
    assert paths[("pd", None)] > 0, paths

    # The killed prefill comes back (Ray Serve), its links heal, traffic returns to P/D.
    wait_for(lambda: any(r["healthy"] and r["pid"] != old_prefill["pid"]
                          for r in status(url)["pools"]["prefill"]), 240, "a new prefill replica")

    def back_to_pd():
        code, tokens, path, _ = _streamed_tokens(url, chat_body(PROMPTS[0], MAX_TOKENS))
        assert code == 200 and tokens == expected[PROMPTS[0]]
        return path == "pd"

    wait_for(back_to_pd, 60, "traffic back on P/D")
    wait_for(lambda: all(r["kv_cache_usage"] == 0.0 for r in status(url)["pools"]["prefill"]), lease_s + 15,
              "prefill KV usage back to baseline")
    links = status(url)["links"]
    assert links and any(link["state"] == "closed" for link in links), links
    return paths


def test_admin_api_refuses_bad_keys_and_bad_actions(clusters):
    url = clusters.grpc_url
    assert post(url, "/admin/chaos/kill-links", {}).status_code == 401
    r = post(url, "/admin/chaos/kill-links", {}, headers={"Authorization": "Bearer wrong-key-123456"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    r = post(url, "/admin/chaos/faults", {"explode": 1}, headers=ADMIN)
    assert r.status_code == 400 and "unknown fault keys" in r.json()["error"]["message"]
    r = post(url, "/admin/chaos/kill-replica", {"pool": "router"}, headers=ADMIN)
    assert r.status_code == 400
    r = post(url, "/admin/chaos/kill-replica", {"pool": "prefill", "replica": "nope"}, headers=ADMIN)
    assert r.status_code == 400 and "no replica" in r.json()["error"]["message"]


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_chaos_under_load_loses_nothing_and_heals(clusters, transport):
    url = clusters.grpc_url if transport == "grpc" else clusters.pd_url
    cfg = clusters.grpc_cfg if transport == "grpc" else clusters.pd_cfg
    paths = run_chaos(url, clusters.mono_url, lease_s=cfg.kv_transfer.lease_seconds)
    print(f"\n{transport}: paths under chaos: {dict(paths)}")


@pytest.mark.soak
@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_chaos_soak(clusters, transport):
    url = clusters.grpc_url if transport == "grpc" else clusters.pd_url
    cfg = clusters.grpc_cfg if transport == "grpc" else clusters.pd_cfg
    run_chaos(url, clusters.mono_url, requests=2000, concurrency=16, link_rounds=20,
              lease_s=cfg.kv_transfer.lease_seconds)


def test_zzz_decode_killed_mid_stream_resumes_token_for_token(clusters):
    """The decode replica dies while streaming; the router resumes on a healthy engine (here the
    prefill engine, the only other one) from prompt + tokens sent. Runs last: it kills decode."""
    import httpx

    url = clusters.grpc_url
    body = chat_body("Resume me exactly where I stopped: " + "stream token cache " * 20, max_tokens=400)
    expected = post(clusters.mono_url, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]
    before = _sample_metric(url, 'pdserve_stream_resumes_total{outcome="resumed"}')
    got, events, killed, gap = [], [], False, []
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                got.extend(t for ch in chunk["choices"] for t in (ch.get("token_ids") or []))
                if len(got) >= 10 and not killed:
                    k = post(url, "/admin/chaos/kill-replica", {"pool": "decode"}, headers=ADMIN)
                    assert k.status_code == 200, k.text
                    killed, t_kill, n_kill = True, time.monotonic(), len(got)
                elif killed and len(got) > n_kill and not gap:
                    gap.append(time.monotonic() - t_kill)
    assert killed and events[-1] == "data: [DONE]"
    print(f"\nstream resumed {gap[0] * 1000:.0f} ms after the decode replica was killed")
    assert got == expected, (len(got), len(expected))
    assert _sample_metric(url, 'pdserve_stream_resumes_total{outcome="resumed"}') >= before + 1


def _sample_metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
