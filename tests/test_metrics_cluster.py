"""/metrics after real traffic: histogram counts match what was sent, and the goodput counter
separates requests that met their class SLO from those that missed it (the tenants app gives
Standard a 1.5 s end-to-end SLO, which the test meets or misses by choosing max_tokens)."""
from __future__ import annotations

import time

import httpx
import pytest

from pdserve.router.config import DEV_ADMIN_KEY
from tests.conftest import STANDARD_E2E_SLO_MS
from tests.helpers import TIMEOUT, chat_body, metric_samples, post

pytestmark = pytest.mark.cluster
ADMIN = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
KEY = {"Authorization": "Bearer demo-standard"}


def stream(url: str, max_tokens: int) -> int:
    tokens = 0
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", url + "/v1/chat/completions", headers=KEY,
                      json=chat_body("metrics", max_tokens=max_tokens, stream=True,
                                     stream_options={"include_usage": True})) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"usage":{' in line and '"completion_tokens":' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0])
    return tokens


def test_histograms_count_the_requests_and_goodput_separates_met_from_missed(clusters):
    url = clusters.tenants_base
    post(url, "/admin/ladder", {"rung": 0}, headers=ADMIN)  # no cap on max_tokens during the test
    try:
        before = metric_samples(url)
        short = [stream(url, 8) for _ in range(6)]
        long = [stream(url, 1200) for _ in range(2)]  # >= 1200 decode steps: well past 1.5 s here
        time.sleep(3 * clusters.tenants_cfg.router.load_poll_interval_s)  # engine totals reach the router
        after = metric_samples(url)
    finally:
        post(url, "/admin/ladder", {"auto": True}, headers=ADMIN)
    assert short == [8] * 6 and long == [1200] * 2
    assert STANDARD_E2E_SLO_MS == 1500

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    cls = 'class="standard",path="pd"'
    assert delta('pdserve_requests_total{endpoint="chat",path="pd",status="200"}') == 8
    for hist in ("pdserve_ttft_seconds", "pdserve_e2e_seconds", "pdserve_tpot_seconds"):
        assert delta(f"{hist}_count{{{cls}}}") == 8, hist
        assert delta(f'{hist}_bucket{{class="standard",le="+Inf",path="pd"}}') == 8, hist
    for stage in ("queue", "prefill", "kv_transfer", "decode_first_token"):
        assert delta(f'pdserve_ttft_breakdown_seconds_count{{stage="{stage}"}}') == 8, stage
    assert delta('pdserve_slo_requests_total{class="standard",met="true"}') == 6
    assert delta('pdserve_slo_requests_total{class="standard",met="false"}') == 2
    assert delta('pdserve_goodput_requests_total{class="standard"}') == 6
    assert after['pdserve_goodput_rps{class="standard"}'] > 0
    assert delta('pdserve_admission_total{class="standard",decision="admitted",reason="ok"}') == 8
    assert delta('pdserve_tenant_tokens_total{kind="output",tenant="standard"}') == 6 * 8 + 2 * 1200
    assert delta('pdserve_kv_transfer_seconds_count{transport="grpc"}') == 8
    assert delta('pdserve_kv_transfer_bytes_total{transport="grpc"}') > 0
    assert after['pdserve_autoscaler_target_replicas{pool="decode"}'] == 1
    assert after['pdserve_replica_kv_cache_usage{pool="decode",replica="%s"}' % _decode_id(url)] >= 0


def _decode_id(url: str) -> str:
    return httpx.get(url + "/pdserve/status").json()["pools"]["decode"][0]["replica"]
