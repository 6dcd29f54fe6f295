"""The official openai client against the P/D cluster, plus disconnects and metrics."""
from __future__ import annotations

import time

import httpx
import pytest

from helpers import chat_body, pool_totals, vllm_counter, wait_for

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
    """A client that hangs up after a few tokens of a 1,500-token answer stops the decode
    engine: vLLM's own generated-token counter stops far short of max_tokens, and neither
    engine keeps the request or its KV."""
    max_tokens = 1500
    body = chat_body("Write a very long story about prefill and decode.", max_tokens=max_tokens)
    before = vllm_counter("pd", "decode", "vllm:generation_tokens_total")
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", clusters.pd_url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            assert r.headers["x-pdserve-path"] == "pd"
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 5:
                    break
    t_gone = time.monotonic()
    # Wait for the decode engine to drop the request (running 0), then for its counter to
    # settle; without the abort it runs on to max_tokens (tens of seconds here) and the
    # counter reaches 1,500.
    deadline, running, generated = t_gone + 60, None, None
    while time.monotonic() < deadline:
        running = pool_totals(clusters.pd_url, "decode", "running")
        now = vllm_counter("pd", "decode", "vllm:generation_tokens_total") - before
        if running == 0 and now == generated:
            break
        generated = now
        time.sleep(0.5)
    generated = vllm_counter("pd", "decode", "vllm:generation_tokens_total") - before
    stopped_after = time.monotonic() - t_gone
    print(f"\ndecode generated {generated:.0f} of {max_tokens} tokens; dropped {stopped_after:.1f} s after the hang-up")
    assert generated >= 4, generated  # the counter does count this request's tokens
    assert generated < max_tokens / 10, generated
    assert running == 0, running
    # Both engines drop the request and release its KV.
    wait_for(lambda: pool_totals(clusters.pd_url, "decode", "kv_cache_usage")
             + pool_totals(clusters.pd_url, "prefill", "kv_cache_usage") == 0, 30, "both pools' KV usage at 0", 0.5)


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
