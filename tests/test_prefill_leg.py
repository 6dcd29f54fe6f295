"""The prefill leg (prefill/leg.py) alone: its body, its KV lease, how its answer is read,
and how waiting on it ends (answer, timeout, lost replica, error). In-memory pools."""
from __future__ import annotations

import asyncio

import pytest
from router_fakes import CHAT, MemoryCluster, MemoryEngine, run

from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause
from pdserve.prefill.leg import KVLease, await_answer, prefill_body, read_answer, run_prefill


def test_prefill_body_is_one_token_not_streamed_and_keeps_the_kv():
    body = dict(CHAT, stream=True, stream_options={"include_usage": True}, max_completion_tokens=9, logprobs=True,
                top_logprobs=2, n=1, temperature=0)
    p = prefill_body(body)
    assert p["max_tokens"] == 1 and p["stream"] is False
    assert p["kv_transfer_params"]["do_remote_decode"] is True and p["kv_transfer_params"]["do_remote_prefill"] is False
    assert not {"stream_options", "max_completion_tokens", "logprobs", "top_logprobs", "n"} & set(p)
    assert p["temperature"] == 0 and p["messages"] == CHAT["messages"]
    assert body["stream"] is True and "kv_transfer_params" not in body  # the client's body is untouched


@pytest.mark.parametrize("budget,elapsed,want", [(1.0, 0.2, 0.8), (1.0, 0.99, 0.05), (30.0, 0.0, 5.0),
                                                 (0.5, 0.1234567, 0.377)])
def test_the_lease_deadline_is_what_the_ttft_budget_left_within_bounds(budget, elapsed, want):
    assert KVLease.deadline_s(budget, elapsed, min_s=0.05, max_s=5.0) == want


def test_a_lease_passes_on_the_params_plus_the_deadline():
    lease = KVLease({"remote_engine_id": "e", "remote_block_ids": [1, 2]})
    assert lease.for_decode(0.5) == {"remote_engine_id": "e", "remote_block_ids": [1, 2], "transfer_deadline_s": 0.5}
    assert "transfer_deadline_s" not in lease.params


def test_reading_the_answer():
    ok = read_answer(("json", {"kv_transfer_params": {"k": 1}}), None, 0.1)
    assert ok.lease.params == {"k": 1} and ok.cause is None and ok.seconds == 0.1
    assert read_answer(("json", {"kv_transfer_params": None}), None, 0.1).cause is FallbackCause.NO_KV_PARAMS
    assert read_answer(("json", {}), None, 0.1).cause is FallbackCause.NO_KV_PARAMS
    assert read_answer(None, None, None).cause is FallbackCause.PREFILL_ERROR  # ended without an answer
    five = read_answer(("error", 503, {"error": {}}), None, 0.1)
    assert five.cause is FallbackCause.PREFILL_ERROR and five.seconds == 0.1
    four = read_answer(("error", 422, {"error": {"code": 422}}), None, 0.1)
    assert four.client_error == (422, {"error": {"code": 422}}) and four.cause is None
    for cause in (FallbackCause.PREFILL_TIMEOUT, FallbackCause.PREFILL_REPLICA_LOST):
        assert read_answer(None, cause, None).cause is cause


def _pool(**script):
    c = MemoryCluster("pd")
    engine = c.add("prefill", MemoryEngine("prefill", "p0", **script))
    return c, c.pools["prefill"], engine


def test_run_prefill_answers_a_lease_and_the_time_it_took():
    c, pool, engine = _pool()
    result = run(run_prefill(pool, "p0", "chat", dict(CHAT), timeout_s=5, poll_s=0.05))
    assert result.lease.params == {"stub": True} and result.cause is None and result.seconds >= 0
    assert engine.calls[0][1]["max_tokens"] == 1
    assert pool.replicas["p0"].inflight == 0  # tracked while it ran


def test_waiting_times_out_and_cancels_the_call():
    c, pool, engine = _pool(hang_after=0)
    result = run(run_prefill(pool, "p0", "chat", dict(CHAT), timeout_s=0.15, poll_s=0.05))
    assert result.cause is FallbackCause.PREFILL_TIMEOUT and result.seconds is None
    assert engine.aborted == 1


@pytest.mark.parametrize("swept", [True, False])
def test_waiting_ends_when_the_replica_is_lost(swept):
    c, pool, engine = _pool(hang_after=0)

    async def main():
        leg = Leg(pool, "p0", "chat", prefill_body(CHAT))
        task = asyncio.ensure_future(await_answer(leg, pool, "p0", timeout_s=30, poll_s=0.05))
        await engine.reached_hang.wait()
        pool.replicas["p0"].healthy = False
        if swept:
            pool.sweep()  # the pool gives the leg up: its read raises LegLost
        return await task

    item, cause = run(main())
    assert item is None and cause is FallbackCause.PREFILL_REPLICA_LOST


def test_an_engine_call_that_raises_is_a_prefill_error():
    c, pool, engine = _pool(raise_first=RuntimeError("boom"))
    result = run(run_prefill(pool, "p0", "chat", dict(CHAT), timeout_s=5, poll_s=0.05))
    assert result.cause is FallbackCause.PREFILL_ERROR


def test_prefill_does_not_import_the_router():
    import ast
    import pathlib

    import pdserve.prefill.leg as mod

    for path in pathlib.Path(mod.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("pdserve.router", "pdserve.cluster")), path
