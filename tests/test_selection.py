"""Pair selection pipeline, on plain candidate records (no engines involved)."""
import random

from pdserve.router.selection import Candidate, KVHeadroomFilter, MinScorePicker, least_loaded


def test_least_loaded_prefers_idle_replica():
    pipe = least_loaded()
    cands = [Candidate("a", "prefill", running=3), Candidate("b", "prefill", running=0, waiting=0),
             Candidate("c", "prefill", running=1, waiting=2)]
    assert pipe.pick(cands).replica_id == "b"


def test_router_inflight_counts_even_before_engine_stats_catch_up():
    pipe = least_loaded()
    cands = [Candidate("a", "decode", inflight=5), Candidate("b", "decode", inflight=1)]
    assert pipe.pick(cands).replica_id == "b"


def test_unhealthy_replicas_are_never_picked():
    pipe = least_loaded()
    assert pipe.pick([Candidate("a", "decode", healthy=False)]) is None
    assert pipe.pick([Candidate("a", "decode", healthy=False), Candidate("b", "decode", running=9)]).replica_id == "b"


def test_decode_pick_avoids_full_kv_cache():
    pipe = least_loaded(kv_headroom=0.9)
    cands = [Candidate("full", "decode", kv_cache_usage=0.97), Candidate("busy", "decode", running=4, kv_cache_usage=0.5)]
    assert pipe.pick(cands).replica_id == "busy"
    # With every replica full, the filter keeps them all rather than refusing service.
    assert KVHeadroomFilter(0.9)([Candidate("x", "decode", kv_cache_usage=0.99)])


def test_ties_spread_over_replicas():
    picker = MinScorePicker(rng=random.Random(1))
    pipe = least_loaded()
    pipe.picker = picker
    cands = [Candidate(str(i), "prefill") for i in range(4)]
    assert len({pipe.pick(cands).replica_id for _ in range(50)}) == 4
