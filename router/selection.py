"""Replica selection as a pipeline of small plugins: filters, then scorers, then a picker.

Each piece is named, and the config lists the ones each pool uses, with their weights
(``router.selection``, typed in router/selection_config.py; llm-d's scheduler reads the same
way): ``build_pipeline`` makes a pipeline from a pool's section with the factory registered
under each name (``register``). The pipeline sees plain ``Candidate`` records and the request
being placed (``SelectionRequest``), and knows nothing of Ray. Plugins that need more than a
candidate's load live in their own module (router/scorers/).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from pdserve.router.selection_config import PoolSelectionSpec


@dataclass
class Candidate:
    replica_id: str
    pool: str
    healthy: bool = True
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    # Requests this router has sent and not yet seen finish; fresher than engine stats.
    inflight: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class SelectionRequest:
    """What a scorer may know of the request being placed: its prompt (``prompt``: the prefix
    index's PromptKeys, None when the router did not tokenize it) and its length. Cached-token
    counts per replica are kept here, so the decider reuses what the prefix scorer looked up."""

    prompt: Any = None
    prompt_tokens: int = 0
    cached: dict[str, int] = field(default_factory=dict)
    picked: dict[str, "Candidate"] = field(default_factory=dict)  # replica -> its state when picked


class Filter(Protocol):
    name: str

    def __call__(self, cands: list[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    name: str

    def __call__(self, cand: Candidate, request: Optional[SelectionRequest] = None) -> float: ...


@dataclass
class HealthyFilter:
    name: str = "healthy"

    def __call__(self, cands):
        return [c for c in cands if c.healthy]


@dataclass
class KVHeadroomFilter:
    """Drop replicas whose KV cache is nearly full; keep all if every one is full."""

    max_usage: float = 0.95
    name: str = "kv_headroom"

    def __call__(self, cands):
        roomy = [c for c in cands if c.kv_cache_usage < self.max_usage]
        return roomy or cands


@dataclass
class QueueScorer:
    """Lower is better: what the replica is running and queueing, plus our own in-flight calls."""

    name: str = "queue"

    def __call__(self, c, request=None):
        return max(c.running + c.waiting, c.inflight) + c.waiting


@dataclass
class KVUsageScorer:
    name: str = "kv_usage"

    def __call__(self, c, request=None):
        return c.kv_cache_usage


@dataclass
class MinScorePicker:
    """Lowest weighted score wins; ties go to a random one so load spreads."""

    rng: random.Random = field(default_factory=random.Random)
    name: str = "min_score"

    def __call__(self, scored: list[tuple[float, Candidate]]) -> Optional[Candidate]:
        if not scored:
            return None
        best = min(s for s, _ in scored)
        return self.rng.choice([c for s, c in scored if s == best])


@dataclass
class SelectionPipeline:
    filters: Sequence[Filter]
    scorers: Sequence[tuple[Scorer, float]]
    picker: Callable[[list[tuple[float, Candidate]]], Optional[Candidate]]

    def pick(self, cands: list[Candidate], request: Optional[SelectionRequest] = None) -> Optional[Candidate]:
        for f in self.filters:
            cands = f(cands)
            if not cands:
                return None
        scored = [(sum(w * s(c, request) for s, w in self.scorers), c) for c in cands]
        pick = self.picker(scored)
        if pick is not None and request is not None:
            request.picked[pick.replica_id] = pick
        return pick


def least_loaded(kv_headroom: Optional[float] = None) -> SelectionPipeline:
    """The default for both pools; decode adds the KV-headroom filter and a KV tie-breaker."""
    filters: list[Filter] = [HealthyFilter()]
    scorers: list[tuple[Scorer, float]] = [(QueueScorer(), 1.0)]
    if kv_headroom is not None:
        filters.append(KVHeadroomFilter(kv_headroom))
        scorers.append((KVUsageScorer(), 1.0))
    return SelectionPipeline(filters, scorers, MinScorePicker())


# ---------------------------------------------------------------------------- plugins by name
@dataclass
class SelectionDeps:
    """What plugin factories may draw on besides their own settings."""

    kv_headroom: float = 0.95  # router.decode_kv_headroom, the kv_headroom filter's default
    prefix_index: Any = None  # router/prefix_index.py PrefixIndex, for the prefix scorer


# name -> factory(settings, deps) -> plugin
FACTORIES: dict[str, Callable[[Any, SelectionDeps], Any]] = {}


def register(name: str):
    def add(factory):
        if name in FACTORIES:
            raise ValueError(f"selection plugin {name!r} registered twice")
        FACTORIES[name] = factory
        return factory
    return add


register("healthy")(lambda spec, deps: HealthyFilter())
register("kv_headroom")(lambda spec, deps: KVHeadroomFilter(spec.max_usage or deps.kv_headroom))
register("queue")(lambda spec, deps: QueueScorer())
register("kv_usage")(lambda spec, deps: KVUsageScorer())
register("min_score")(lambda spec, deps: MinScorePicker())


def build_pipeline(spec: PoolSelectionSpec, deps: SelectionDeps) -> SelectionPipeline:
    """A pool's pipeline from its config section."""
    import pdserve.router.scorers  # noqa: F401 - registers the plugins that live in their own modules

    def make(plugin_spec):
        return FACTORIES[plugin_spec.name](plugin_spec, deps)

    return SelectionPipeline([make(f) for f in spec.filters], [(make(s), s.weight) for s in spec.scorers],
                             make(spec.picker))
