"""The `router.selection` section: which filters, scorers and picker choose a replica in each pool.

Each plugin is named, with its own typed settings; router/selection.py builds the pipelines from
them (a factory per name). A pool the section leaves out keeps the default pipeline:

    prefill:            filters [healthy]               scorers [queue x1]                picker min_score
    decode, monolithic: filters [healthy, kv_headroom]  scorers [queue x1, kv_usage x1]  picker min_score

A plugin without settings may be written as its bare name (``filters: [healthy, kv_headroom]``).
This module imports only pydantic, so any layer may read it (tests/test_import_contract.py).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _named(value):
    """``"healthy"`` is ``{"name": "healthy"}``."""
    return {"name": value} if isinstance(value, str) else value


# ---------------------------------------------------------------------------- filters
class HealthyFilterSpec(_Strict):
    """Drops replicas whose load polls or connections failed."""

    name: Literal["healthy"]


class KVHeadroomFilterSpec(_Strict):
    """Drops replicas whose KV cache is nearly full (keeps all if every one is)."""

    name: Literal["kv_headroom"]
    # Eligible while KV usage stays below this; unset: router.decode_kv_headroom.
    max_usage: Optional[float] = Field(None, gt=0, le=1)


FilterSpec = Annotated[Union[HealthyFilterSpec, KVHeadroomFilterSpec], Field(discriminator="name")]


# ---------------------------------------------------------------------------- scorers (lower is better)
class QueueScorerSpec(_Strict):
    """What the replica runs and queues, plus this router's calls in flight to it (requests)."""

    name: Literal["queue"]
    weight: float = Field(1.0, ge=0)


class KVUsageScorerSpec(_Strict):
    """The replica's KV cache usage (0 to 1)."""

    name: Literal["kv_usage"]
    weight: float = Field(1.0, ge=0)


class PrefixScorerSpec(_Strict):
    """The share of the prompt the replica's KV cache does not hold (0: all cached, 1: none), from
    the engines' own KV cache events (router/prefix_index.py). Weighed against ``queue``: with
    weight 2, a replica holding the whole prompt is worth two more queued requests."""

    name: Literal["prefix"]
    weight: float = Field(1.0, ge=0)


ScorerSpec = Annotated[Union[QueueScorerSpec, KVUsageScorerSpec, PrefixScorerSpec], Field(discriminator="name")]


# ---------------------------------------------------------------------------- pickers
class MinScorePickerSpec(_Strict):
    """The lowest weighted score wins; ties go to a random one, so load spreads."""

    name: Literal["min_score"]


PickerSpec = Annotated[Union[MinScorePickerSpec], Field(discriminator="name")]


class PoolSelectionSpec(_Strict):
    filters: list[FilterSpec] = Field(default_factory=lambda: [HealthyFilterSpec(name="healthy")])
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [QueueScorerSpec(name="queue")])
    picker: PickerSpec = Field(default_factory=lambda: MinScorePickerSpec(name="min_score"))

    @field_validator("filters", "scorers", mode="before")
    @classmethod
    def _bare_names(cls, v):
        return [_named(x) for x in v] if isinstance(v, list) else v

    @field_validator("picker", mode="before")
    @classmethod
    def _bare_picker(cls, v):
        return _named(v)

    @field_validator("filters")
    @classmethod
    def _needs_healthy(cls, v):
        # An unhealthy replica holds calls until Ray Serve restarts it: no pipeline may pick one.
        if not any(f.name == "healthy" for f in v):
            raise ValueError("a selection pipeline must keep the 'healthy' filter")
        return v

    @field_validator("scorers")
    @classmethod
    def _distinct(cls, v):
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"scorers named twice: {names}")
        return v

    def uses(self, name: str) -> bool:
        return any(p.name == name for p in (*self.filters, *self.scorers, self.picker))


def default_selection(pool: str) -> PoolSelectionSpec:
    """Today's pipeline for a pool: the decode and monolithic pools also watch their KV cache."""
    if pool == "prefill":
        return PoolSelectionSpec()
    return PoolSelectionSpec(
        filters=[HealthyFilterSpec(name="healthy"), KVHeadroomFilterSpec(name="kv_headroom")],
        scorers=[QueueScorerSpec(name="queue"), KVUsageScorerSpec(name="kv_usage")])


class SelectionSpec(_Strict):
    """Per pool, its selection pipeline; unset: the default above."""

    prefill: Optional[PoolSelectionSpec] = None
    decode: Optional[PoolSelectionSpec] = None
    monolithic: Optional[PoolSelectionSpec] = None

    def for_pool(self, pool: str) -> PoolSelectionSpec:
        return getattr(self, pool) or default_selection(pool)

    def uses(self, name: str) -> bool:
        return any(self.for_pool(p).uses(name) for p in ("prefill", "decode", "monolithic"))
