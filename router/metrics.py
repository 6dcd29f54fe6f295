"""Prometheus metrics the router exports at /metrics (base units, pdserve_ prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._latencies(r)
        self._pd_links(r)
        self._resumes_and_admission(r)
        self._replicas(r)
        self._routing(r)

    def _latencies(self, r: CollectorRegistry) -> None:
        """Requests and their latencies."""
        self.requests = Counter("pdserve_requests_total", "Requests answered, by path, endpoint and HTTP status",
                                ["path", "endpoint", "status"], registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "Arrival to first token (streamed requests)",
                              ["path", "class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_tpot_seconds", "Mean time per output token after the first, per request",
                              ["path", "class"], buckets=_TPOT_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_itl_seconds", "Gaps between output-token chunks as the router sent them",
                             ["path", "class"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "Arrival to last token", ["path", "class"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_leg = Histogram("pdserve_prefill_leg_seconds", "Router-measured prefill leg (P/D only)",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_breakdown = Histogram(
            "pdserve_ttft_breakdown_seconds",
            "Streamed P/D requests' TTFT by stage: prefill leg, KV transfer (as the decode engine "
            "timed its pull; gRPC transport), and decode_first_token (routing, decode queue, first step)",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)

    def _pd_links(self, r: CollectorRegistry) -> None:
        """Fallback, P/D links and KV transfers."""
        self.fallbacks = Counter("pdserve_fallback_total", "Requests served by monolithic fallback, by cause",
                                 ["cause"], registry=r)
        self.link_state = Gauge("pdserve_link_breaker_state",
                                 "Circuit breaker of each prefill->decode KV link: 0 closed, 1 half-open, 2 open",
                                 ["prefill", "decode"], registry=r)
        self.kv_transfer_failures = Counter("pdserve_kv_transfer_failures_total",
                                            "KV transfers that decode reported failed, by transport and kind",
                                            ["transport", "kind"], registry=r)
        self.kv_transfer_seconds = Histogram(
            "pdserve_kv_transfer_seconds", "Per-request KV pull time as the decode engine timed it (transports "
            "that name their transfers: gRPC)", ["transport"], buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes the decode pool pulled",
                                         ["transport"], registry=r)
        self.kv_transfer_busy = Counter("pdserve_kv_transfer_busy_seconds",
                                        "Summed KV transfer time the decode pool reported (all transports)",
                                        ["transport"], registry=r)
        self.kv_transfers = Counter("pdserve_kv_transfers", "KV transfers the decode pool completed",
                                    ["transport"], registry=r)
        self.autoscaler_target = Gauge("pdserve_autoscaler_target_replicas",
                                       "Replicas Ray Serve keeps for each pool: an autoscaled pool's "
                                       "starting or running ones, a fixed pool's configured count", ["pool"], registry=r)

    def _resumes_and_admission(self, r: CollectorRegistry) -> None:
        """Resumes, admission, tenants, goodput and the A/B split."""
        self.stream_resumes = Counter("pdserve_stream_resumes_total",
                                      "Streams whose engine died mid-stream: resumed elsewhere, or ended with an "
                                      "error event once resumes ran out", ["outcome"], registry=r)
        self.admissions = Counter("pdserve_admission_total",
                                  "Admission decisions by class, decision (admitted / rejected) and reason",
                                  ["class", "decision", "reason"], registry=r)
        self.queue_wait = Histogram("pdserve_queue_wait_seconds", "Time admitted requests waited for a slot",
                                    ["class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rung = Gauge("pdserve_degradation_rung",
                          "Degradation ladder rung: 0 normal, 1 stop sheddable, 2 cap standard, "
                          "3 degrade standard, 4 critical only", registry=r)
        self.tenant_tokens = Counter("pdserve_tenant_tokens_total", "Tokens served per tenant (input, output)",
                                     ["tenant", "kind"], registry=r)
        self.slo_requests = Counter("pdserve_slo_requests_total",
                                    "Served requests judged against their class SLOs (met: true / false)",
                                    ["class", "met"], registry=r)
        self.goodput_requests = Counter("pdserve_goodput_requests_total",
                                        "Requests that met every SLO of their class", ["class"], registry=r)
        self.goodput_rps = Gauge("pdserve_goodput_rps",
                                 "Requests per second that met every SLO, over the sliding window "
                                 "slo.goodput_window_s", ["class"], registry=r)
        self.ab_requests = Counter("pdserve_ab_requests_total",
                                   "Requests by online A/B arm (pd / monolithic); their latencies are in the "
                                   "histograms under path pd+fallback / monolithic", ["arm"], registry=r)

    def _replicas(self, r: CollectorRegistry) -> None:
        """The router's in-flight requests and each replica's polled load."""
        self.inflight = Gauge("pdserve_inflight_requests", "Requests in the router now", registry=r)
        self.replica_kv = Gauge("pdserve_replica_kv_cache_usage", "KV-cache usage per replica",
                                ["pool", "replica"], registry=r)
        self.replica_running = Gauge("pdserve_replica_running", "Running requests per replica",
                                     ["pool", "replica"], registry=r)
        self.replica_preemptions = Gauge("pdserve_replica_preemptions_total",
                                         "Requests the engine preempted since it started, per replica",
                                         ["pool", "replica"], registry=r)
        self.replica_waiting = Gauge("pdserve_replica_waiting", "Waiting requests per replica",
                                     ["pool", "replica"], registry=r)

    def _routing(self, r: CollectorRegistry) -> None:
        """The disaggregation decider and the prefix index (router/disaggregate.py)."""
        self.disaggregation = Counter("pdserve_disaggregation_total",
                                      "P/D requests by the way router.disaggregation sent them (pd, decode_local, "
                                      "prefill_whole) and why", ["way", "reason"], registry=r)
        self.decider_input = Gauge("pdserve_decider_input",
                                   "What the adaptive decider reads: fitted prefill, KV transfer and decode step "
                                   "models, prefill busy share, mean output tokens", ["name"], registry=r)
        self.prefill_backlog_tokens = Gauge(
            "pdserve_prefill_backlog_tokens",
            "Uncached prompt tokens this router sent each replica to prefill and has not yet seen done",
            ["replica"], registry=r)
        self.prefix_index_blocks = Gauge("pdserve_prefix_index_blocks",
                                         "KV blocks the prefix index knows each replica holds", ["replica"],
                                         registry=r)
        self.prefix_tokens = Counter("pdserve_prefix_tokens_total",
                                     "Prompt tokens of P/D prefill legs and streamed whole requests, and how many "
                                     "of them the engine that prefilled them held (by the prefix index)",
                                     ["pool", "kind"], registry=r)
