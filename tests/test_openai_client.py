"""The official openai client against the P/D cluster, plus disconnects and metrics."""
from __future__ import annotations

import time

import httpx
import pytest

from helpers import chat_body, pool_totals

pytestmark = pytest.mark.cluster


def test_openai_client_stream_and_non_stream(clusters):
    from openai import OpenAI

    client = OpenAI(base_url=clusters.pd_url + "/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    msgs = [{"role": "user", "content": "Say something about disaggregated serving."}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_client_disconnect_aborts_both_engines(clusters):
    body = chat_body("Write a very long story about prefill and decode.", max_tokens=1500)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", clusters.pd_url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            assert r.headers["x-pdserve-path"] == "pd"
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 5:
                    break
    # Both engines drop the request and release its KV well before 1500 tokens are done.
    deadline = time.time() + 20
    while time.time() < deadline:
        running = pool_totals(clusters.pd_url, "decode", "running")
        kv = pool_totals(clusters.pd_url, "decode", "kv_cache_usage") + pool_totals(clusters.pd_url, "prefill",
                                                                                  "kv_cache_usage")
        if running == 0 and kv == 0:
            break
        time.sleep(0.5)
    assert running == 0 and kv == 0, (running, kv)


def test_metrics_count_requests(clusters):
    with httpx.Client(timeout=60) as c:
        before = c.get(clusters.pd_url + "/metrics").text
        r = c.post(clusters.pd_url + "/v1/chat/completions", json=chat_body("count me", max_tokens=3))
        assert r.status_code == 200
        after = c.get(clusters.pd_url + "/metrics").text

    def count(text):
        for line in text.splitlines():
            if line.startswith('pdserve_requests_total{endpoint="chat",path="pd",status="200"}'):
                return float(line.split()[-1])
        return 0.0

    assert count(after) == count(before) + 1
    assert "pdserve_ttft_seconds_bucket" in after and "pdserve_replica_kv_cache_usage" in after
