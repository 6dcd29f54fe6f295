"""How often the router polls its replicas' load (router/polling.py): fast while engine calls
run or ran a moment ago, slowly when the router is idle; and what its status shows of a poll."""
from __future__ import annotations

import time

from router_fakes import CHAT, MemoryCluster, MemoryEngine, run

from pdserve.router.polling import IDLE_AFTER_S


def cluster(**router) -> MemoryCluster:
    c = MemoryCluster("pd", **router)
    c.add("prefill", MemoryEngine("prefill", "p0"))
    c.add("decode", MemoryEngine("decode", "d0"))
    c.build()
    return c


def test_an_idle_router_polls_slowly_and_a_request_makes_it_poll_fast_again():
    c = cluster(load_poll_interval_s=0.25, idle_load_poll_interval_s=1.5)
    poller = c.router.poller
    assert poller.interval(time.monotonic()) == 1.5  # no call yet
    assert run(c.serve(CHAT)).status_code == 200
    now = time.monotonic()
    assert poller.interval(now) == 0.25
    assert poller.interval(now + IDLE_AFTER_S + 0.1) == 1.5


def test_a_call_in_flight_keeps_the_fast_polls():
    c = cluster(load_poll_interval_s=0.25, idle_load_poll_interval_s=1.5)
    with c.pools["decode"].track("d0"):  # a stream still relayed long after it started
        assert c.router.poller.interval(time.monotonic() + 60) == 0.25
    assert c.router.poller.interval(time.monotonic() + 60) == 1.5


def test_the_idle_interval_is_never_shorter_than_the_busy_one():
    c = cluster(load_poll_interval_s=0.5, idle_load_poll_interval_s=0.1)
    assert c.router.poller.interval(time.monotonic()) == 0.5


def test_status_names_each_replicas_stream_port_but_never_its_token():
    c = cluster()
    c.pools["decode"].replicas["d0"].load["stream"] = {"host": "10.0.0.2", "port": 4321, "token": "s3cret"}
    (row,) = c.pools["decode"].status()
    assert row["stream_port"] == 4321 and "s3cret" not in repr(row)
