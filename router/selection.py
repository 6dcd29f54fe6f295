"""Replica selection as a pipeline of small plugins: filters, then scorers, then a picker.

Each piece is named, so a config can list the ones it wants (llm-d's scheduler reads
the same way). The pipeline sees plain ``Candidate`` records and knows nothing of Ray.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence


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


class Filter(Protocol):
    name: str

    def __call__(self, cands: list[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    name: str

    def __call__(self, cand: Candidate) -> float: ...


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

    def __call__(self, c):
        return max(c.running + c.waiting, c.inflight) + c.waiting


@dataclass
class KVUsageScorer:
    name: str = "kv_usage"

    def __call__(self, c):
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

    def pick(self, cands: list[Candidate]) -> Optional[Candidate]:
        for f in self.filters:
            cands = f(cands)
            if not cands:
                return None
        scored = [(sum(w * s(c) for s, w in self.scorers), c) for c in cands]
        return self.picker(scored)


def least_loaded(kv_headroom: Optional[float] = None) -> SelectionPipeline:
    """The default for both pools; decode adds the KV-headroom filter and a KV tie-breaker."""
    filters: list[Filter] = [HealthyFilter()]
    scorers: list[tuple[Scorer, float]] = [(QueueScorer(), 1.0)]
    if kv_headroom is not None:
        filters.append(KVHeadroomFilter(kv_headroom))
        scorers.append((KVUsageScorer(), 1.0))
    return SelectionPipeline(filters, scorers, MinScorePicker())
