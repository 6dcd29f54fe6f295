"""Prometheus metrics the router exports at /metrics (base units, pdserve_ prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdserve_requests_total", "Requests answered, by path, endpoint and HTTP status",
                                ["path", "endpoint", "status"], registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "Arrival to first token", ["path"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_tpot_seconds", "Mean time per output token after the first, per request",
                              ["path"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "Arrival to last token", ["path"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_leg = Histogram("pdserve_prefill_leg_seconds", "Router-measured prefill leg (P/D only)",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_breakdown = Histogram(
            "pdserve_ttft_breakdown_seconds",
            "Streamed P/D requests' TTFT by stage: prefill leg, KV transfer (as the decode engine "
            "timed its pull; gRPC transport), and decode_first_token (routing, decode queue, first step)",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("pdserve_fallback_total", "Requests served by monolithic fallback, by cause",
                                 ["cause"], registry=r)
        self.link_state = Gauge("pdserve_link_breaker_state",
                                 "Circuit breaker of each prefill->decode KV link: 0 closed, 1 half-open, 2 open",
                                 ["prefill", "decode"], registry=r)
        self.kv_transfer_failures = Counter("pdserve_kv_transfer_failures_total",
                                            "KV transfers that decode reported failed, by transport and kind",
                                            ["transport", "kind"], registry=r)
        self.stream_resumes = Counter("pdserve_stream_resumes_total",
                                      "Streams whose engine died mid-stream: resumed elsewhere, or ended with an "
                                      "error event once resumes ran out", ["outcome"], registry=r)
        self.inflight = Gauge("pdserve_inflight_requests", "Requests in the router now", registry=r)
        self.replica_kv = Gauge("pdserve_replica_kv_cache_usage", "KV-cache usage per replica",
                                ["pool", "replica"], registry=r)
        self.replica_running = Gauge("pdserve_replica_running", "Running requests per replica",
                                     ["pool", "replica"], registry=r)
        self.replica_waiting = Gauge("pdserve_replica_waiting", "Waiting requests per replica",
                                     ["pool", "replica"], registry=r)
