"""The router's parts, wired together: built from a config and pools, with the request
checker (its tokenizer) and the model's KV size handed in, so tests build one with no
socket, no tokenizer download and no Ray (``Router(cfg, pools, checker, kv_bytes)``);
``Router.from_config`` loads the real ones."""
from __future__ import annotations

from typing import Any

from pdserve.admission.controller import AdmissionController
from pdserve.admission.fleet_gate import kv_bytes_per_token
from pdserve.admission.tenants import TenantDirectory
from pdserve.engine.tiny_model import resolve_model
from pdserve.fallback.breaker import STATE_VALUE, BreakerSettings, LinkBreakers
from pdserve.router.ab_split import TrafficSplit
from pdserve.router.accounting import Accounting
from pdserve.router.config import resolve_admin_key
from pdserve.router.goodput import GoodputWindow
from pdserve.router.legs import LegRunner
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pipeline import Pipeline
from pdserve.router.placement import Placement
from pdserve.router.polling import LoadPoller
from pdserve.router.pools import Pool
from pdserve.router.protocol import RequestChecker
from pdserve.router.respond import Responder
from pdserve.router.disaggregate import Disaggregator
from pdserve.router.kv_event_feed import KVEventFeed
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.selection import SelectionDeps, build_pipeline
from pdserve.settings.cluster import ClusterConfig


def model_kv_bytes_per_token(cfg: ClusterConfig, model_path: str) -> int:
    from transformers import AutoConfig

    return kv_bytes_per_token(AutoConfig.from_pretrained(model_path).to_dict(), cfg.model.dtype)


class Router:
    """Shared state (pools, admission, breakers, metrics, the A/B split) and the stages
    that use it. ``checker`` needs ``check(endpoint, body) -> CheckedRequest``."""

    def __init__(self, cfg: ClusterConfig, pools: dict[str, Pool], checker: Any, kv_bytes_per_token: int) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.pools = pools
        self.checker = checker
        self.kv_bytes_per_token = kv_bytes_per_token
        self.metrics = RouterMetrics()
        # Which prompt prefixes each engine caches, from the engines' KV events (when a scorer or
        # the decider reads it), and each pool's selection pipeline as router.selection lists it.
        self.prefix_index = PrefixIndex() if cfg.router.needs_kv_events() else None
        self.kv_feed = KVEventFeed(self.prefix_index) if self.prefix_index is not None else None
        deps = SelectionDeps(kv_headroom=cfg.router.decode_kv_headroom, prefix_index=self.prefix_index)
        self.picks = {name: build_pipeline(cfg.router.selection.for_pool(name), deps)
                      for name in ("prefill", "decode", "monolithic")}
        self.prefill_pick, self.decode_pick = self.picks["prefill"], self.picks["decode"]
        self.disaggregator = Disaggregator(self)
        self.tenants = TenantDirectory(cfg.auth, salt_secret=f"pdserve-cache-salt:{cfg.name}")
        capacity = cfg.admission.max_inflight or self.serving_replicas(cfg) * cfg.engine.max_num_seqs
        self.admission = AdmissionController(cfg.admission, cfg.ladder, capacity, kv_bytes_per_token)
        self.goodput = GoodputWindow(cfg.slo)
        ab = cfg.ab_split
        self.split = TrafficSplit(ab.monolithic_fraction, ab.session_header, salt=f"pdserve-ab:{cfg.name}")
        fb = cfg.fallback
        self.breakers = LinkBreakers(
            BreakerSettings(fb.link_failure_threshold, fb.link_open_seconds, fb.link_half_open_probes),
            on_change=lambda p, d, state: self.metrics.link_state.labels(p, d).set(STATE_VALUE[state]))
        self.admin_key = resolve_admin_key(cfg.admin)
        # the stages, each after the ones it hands work to
        self.account = Accounting(self)
        self.placement = Placement(self)
        self.legs = LegRunner(self)
        self.responder = Responder(self)
        self.pipeline = Pipeline(self)
        self.poller = LoadPoller(self)

    @staticmethod
    def serving_replicas(cfg: ClusterConfig) -> int:
        """The engines whose sequences admission counts as capacity: the decode pool's (each
        request decodes there), and the prefill pool's too where the adaptive decider serves
        whole requests on them."""
        if cfg.mode != "pd":
            return cfg.monolithic.max_replicas
        if cfg.router.disaggregation == "adaptive" and cfg.router.decider.prefill_whole_max_running != 0:
            return cfg.decode.max_replicas + cfg.prefill.max_replicas
        return cfg.decode.max_replicas

    @classmethod
    def from_config(cls, cfg: ClusterConfig, pools: dict[str, Pool]) -> "Router":
        """A router with the model's real tokenizer and KV size (loaded from its files)."""
        model_path = resolve_model(cfg.model.path)
        checker = RequestChecker(cfg.model.served_name, model_path, cfg.model.max_model_len,
                                 chat_template=cfg.engine.chat_template)
        return cls(cfg, pools, checker, model_kv_bytes_per_token(cfg, model_path))
