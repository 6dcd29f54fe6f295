"""The ``prefix`` scorer: prefer the replica whose KV cache already holds the prompt.

Its score is the share of the prompt the replica would have to compute (0: all cached, 1:
none), from the prefix index that follows the engines' own KV cache events
(router/prefix_index.py). Lower is better, as for every scorer; its weight in
``router.selection`` sets what a cache hit is worth against load (``queue`` counts requests).
A request the router did not tokenize, or a replica the index does not follow, scores 1
everywhere: the scorer then leaves the choice to the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pdserve.router.selection import Candidate, SelectionDeps, SelectionRequest, register
from pdserve.router.selection_config import PrefixScorerSpec


@dataclass
class PrefixScorer:
    index: Any  # PrefixIndex
    name: str = "prefix"

    def __call__(self, c: Candidate, request: Optional[SelectionRequest] = None) -> float:
        if request is None or request.prompt is None or not request.prompt_tokens:
            return 1.0
        cached = request.cached.get(c.replica_id)
        if cached is None:
            cached = request.cached[c.replica_id] = self.index.cached_tokens(c.replica_id, request.prompt)
        return 1.0 - cached / request.prompt_tokens


@register("prefix")
def make_prefix_scorer(spec: PrefixScorerSpec, deps: SelectionDeps) -> PrefixScorer:
    if deps.prefix_index is None:
        raise ValueError("the prefix scorer needs the router's prefix index")
    return PrefixScorer(deps.prefix_index)
