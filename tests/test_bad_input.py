"""Bad input gets a 4xx with an OpenAI-style error body, and the cluster goes on serving."""
from __future__ import annotations

import json

import pytest

from helpers import chat_body, pool_totals, post

pytestmark = pytest.mark.cluster

_OK = chat_body("still serving?", max_tokens=4)


def _msgs(content="hi", role="user"):
    return [{"role": role, "content": content}]


CASES = [
    ("malformed json", None, b'{"model": "tiny", "messages": [', 400),
    ("not an object", None, b'[1, 2, 3]', 400),
    ("missing messages", {"model": "tiny", "max_tokens": 4}, None, 400),
    ("empty messages", {"model": "tiny", "messages": [], "max_tokens": 4}, None, 400),
    ("messages wrong type", {"model": "tiny", "messages": "hello", "max_tokens": 4}, None, 400),
    ("max_tokens wrong type", {"model": "tiny", "messages": _msgs(), "max_tokens": "many"}, None, 400),
    ("temperature wrong type", {"model": "tiny", "messages": _msgs(), "temperature": "hot"}, None, 400),
    ("unknown model", {"model": "gpt-9", "messages": _msgs(), "max_tokens": 4}, None, 404),
    ("max_tokens zero", {"model": "tiny", "messages": _msgs(), "max_tokens": 0}, None, 400),
    ("max_tokens negative", {"model": "tiny", "messages": _msgs(), "max_tokens": -5}, None, 400),
    ("prompt plus max_tokens over context", {"model": "tiny", "messages": _msgs("word " * 1000), "max_tokens": 1500},
     None, 400),
    ("prompt alone over context", {"model": "tiny", "messages": _msgs("word " * 2500), "max_tokens": 1}, None, 400),
    ("unknown role", {"model": "tiny", "messages": _msgs(role="wizard"), "max_tokens": 4}, None, 400),
    ("oversized body", None, json.dumps({"model": "tiny", "messages": _msgs("x" * (2 << 20))}).encode(), 413),
]


@pytest.mark.parametrize("name,body,raw,status", CASES, ids=[c[0] for c in CASES])
def test_bad_chat_input(clusters, name, body, raw, status):
    r = post(clusters.pd_url, "/v1/chat/completions", body=body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    ok = post(clusters.pd_url, "/v1/chat/completions", _OK)
    assert ok.status_code == 200


def test_bad_completions_input(clusters):
    r = post(clusters.pd_url, "/v1/completions", {"model": "tiny", "max_tokens": 3})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = post(clusters.pd_url, "/v1/completions", {"model": "tiny", "prompt": {"a": 1}})
    assert r.status_code == 400


def test_rejected_requests_leave_no_kv_behind(clusters):
    """A request rejected for its size never reaches prefill, so no blocks wait on a lease."""
    before = pool_totals(clusters.pd_url, "prefill", "kv_transfers_total")
    for _ in range(3):
        r = post(clusters.pd_url, "/v1/chat/completions",
                 {"model": "tiny", "messages": _msgs("word " * 1000), "max_tokens": 1500})
        assert r.status_code == 400
    import time
    time.sleep(1)
    assert pool_totals(clusters.pd_url, "prefill", "kv_cache_usage") == 0.0
    assert pool_totals(clusters.pd_url, "prefill", "kv_transfers_total") == before
