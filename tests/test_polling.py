"""How often the router polls its replicas' load (router/polling.py): fast while engine calls
run or ran a moment ago, slowly when the router is idle; and what its status shows of a poll."""
from __future__ import annotations

import time

from router_fakes import CHAT, FakeCluster, FakeEngine, MemoryCluster, MemoryEngine, run

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


def test_a_replica_whose_call_just_ended_is_not_polled_over_ray_its_end_frame_reported():
    async def main():
        c = FakeCluster("monolithic")
        c.cfg = c.cfg.model_copy(update={"router": c.cfg.router.model_copy(update={"load_poll_interval_s": 30})})
        for rid in ("m0", "m1"):
            await c.add("monolithic", FakeEngine("monolithic", rid))
        polled: list[str] = []
        load_of = c.load_of

        async def counting(replica_id):
            polled.append(replica_id)
            return await load_of(replica_id)

        c.load_of = counting
        async with c.client() as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        served = next(rid for rid in ("m0", "m1") if c.engines[rid].calls)
        other = "m1" if served == "m0" else "m0"
        report = dict(c.state(served).load)
        rounds = []
        await c.poll()
        rounds.append(sorted(polled))
        polled.clear()
        c.state(served).healthy = False  # a report never stands in for the poll that makes it healthy again
        await c.poll()
        rounds.append(sorted(polled))
        polled.clear()
        c.state(served).streamed_at -= 31  # its report is older than the poll interval now
        await c.poll()
        rounds.append(sorted(polled))
        await c.close()
        return served, other, report, rounds, c

    served, other, report, rounds, c = run(main())
    assert report["replica"] == served and report["stream"]["port"]  # what load() says, as of the call's end
    assert report["steps_total"] == 1  # the stub's requests served, counted before its end frame
    assert rounds == [[other], sorted([served, other]), sorted([served, other])]
    assert c.state(served).healthy


def test_a_report_for_another_replica_or_an_unhealthy_one_changes_no_health():
    c = MemoryCluster("monolithic")
    c.add("monolithic", MemoryEngine("monolithic", "m0"))
    pool = c.pools["monolithic"]
    pool.take_report("m0", {"replica": "m1", "running": 9})  # a report that names another replica
    assert pool.replicas["m0"].load.get("running") == 0 and pool.replicas["m0"].streamed_at == float("-inf")
    pool.replicas["m0"].healthy = False
    pool.take_report("m0", {"replica": "m0", "running": 2})
    assert pool.replicas["m0"].load["running"] == 2 and not pool.replicas["m0"].healthy
    pool.take_report("gone", {"replica": "gone"})  # a replica that left the pool's view meanwhile
    assert "gone" not in pool.replicas


def test_a_fixed_pools_replica_count_is_its_configs_and_serve_status_is_never_asked():
    c = MemoryCluster("pd")
    router = c.build()
    poller = router.poller
    assert not poller._autoscaled
    for name in ("prefill", "decode"):
        expected = c.cfg.pools()[name].replicas
        assert router.metrics.autoscaler_target.labels(name)._value.get() == expected

    async def refused():
        raise AssertionError("serve.status asked for a fixed pool")

    poller.poll_pool_sizes = refused
    run(poller.refresh())
