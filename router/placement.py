"""Where a leg runs: a P/D pair of replicas, or one healthy engine for a whole request.

Selection itself (filters, scorers, picker) is router/selection.py; this module applies
it to the pools, the P/D links' breakers, and the replicas a request already lost.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause
from pdserve.router.selection import SelectionRequest

if TYPE_CHECKING:
    from pdserve.router.core import Router
    from pdserve.router.pools import Pool

WHOLE_ORDER = ("decode", "monolithic", "prefill")  # where a whole request goes after a lost engine


class Placement:
    def __init__(self, router: "Router") -> None:
        self.pools = router.pools
        self.picks = router.picks
        self.prefill_pick = router.prefill_pick
        self.decode_pick = router.decode_pick
        self.breakers = router.breakers

    def spare_leg(self, endpoint: str, body: dict[str, Any], gone: frozenset = frozenset(),
                  order: tuple[str, ...] = WHOLE_ORDER, request: Optional[SelectionRequest] = None) -> Optional[Leg]:
        """One healthy engine serves ``body`` whole (every engine holds full weights): the
        least-loaded replica, not in ``gone``, of the first pool in ``order`` that has one.
        None if there is none: never a call to a pool with no healthy replica, which Ray
        Serve would hold until it restarts one."""
        for name in order:
            pool = self.pools.get(name)
            if pool is None:
                continue
            pick = self.picks[name].pick([c for c in pool.candidates() if c.replica_id not in gone], request)
            if pick is not None:
                return Leg(pool, pick.replica_id, endpoint, body)
        return None

    def respawn(self, dead: Leg, continuation: dict[str, Any]) -> Optional[Leg]:
        """A broken stream's continuation on another healthy engine (decode pool first, then any)."""
        return self.spare_leg("completions", continuation, gone=frozenset({dead.replica_id, dead.served_by}))

    def pick_pair(self, prefill: "Pool", decode: "Pool", request: Optional[SelectionRequest] = None):
        """(prefill, decode, None) for P/D, or a fallback cause. Links with an open breaker are skipped."""
        d_all = decode.candidates()
        if not any(c.healthy for c in d_all):
            return None, None, FallbackCause.NO_DECODE_REPLICA  # whole on a prefill engine, not a wait
        p_cands = prefill.candidates()
        if not any(c.healthy for c in p_cands):
            return None, self.decode_pick.pick(d_all, request), FallbackCause.NO_PREFILL_REPLICA
        tried: set[str] = set()
        while True:
            p = self.prefill_pick.pick([c for c in p_cands if c.replica_id not in tried], request)
            if p is None:
                return None, self.decode_pick.pick(d_all, request), FallbackCause.LINK_OPEN
            tried.add(p.replica_id)
            d = self.decode_pick.pick([c for c in d_all if self.breakers.available(p.replica_id, c.replica_id)],
                                      request)
            if d is not None:
                return p, d, None
