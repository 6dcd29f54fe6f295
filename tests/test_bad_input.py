"""Bad input gets a 4xx with an OpenAI-style error body, and the cluster goes on serving."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers import chat_body, pool_totals, post, vllm_counter, wait_for

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
    # vLLM caps a max_tokens the prompt leaves no room for (and so does pdserve), but refuses one
    # beyond the whole context, and a prompt the context cannot hold
    ("max_tokens over context", {"model": "tiny", "messages": _msgs("word " * 30), "max_tokens": 3000}, None, 400),
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
    """A request rejected for its size never reaches prefill, so no blocks wait on a lease:
    the prefill engine's own prompt-token counter (vLLM's) does not move, while the same
    prompt with a max_tokens that fits moves it by that prompt."""
    url = clusters.pd_url
    big = _msgs("word " * 300)  # 908 prompt tokens: a one-token prefill leg of it would fit

    def prefill_prompt_tokens() -> float:
        return vllm_counter("pd", "prefill", "vllm:prompt_tokens_total")

    before = prefill_prompt_tokens()
    for _ in range(3):
        # max_tokens beyond the 2048-token context: refused at once, before any engine work
        # (a one-token prefill leg would not refuse it, and would hold the prompt's KV)
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": big, "max_tokens": 3000},
                       timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "max_tokens"
    time.sleep(1)
    assert prefill_prompt_tokens() == before
    assert pool_totals(url, "prefill", "kv_cache_usage") == 0.0
    # The control: the same prompt accepted is prefilled there (the counter can move).
    ok = post(url, "/v1/chat/completions", {"model": "tiny", "messages": big, "max_tokens": 2})
    assert ok.status_code == 200 and ok.headers["x-pdserve-path"] == "pd", ok.text
    prompt = ok.json()["usage"]["prompt_tokens"]
    wait_for(lambda: prefill_prompt_tokens() - before >= prompt, 10, "the prefill engine's prompt-token counter",
             0.2)
