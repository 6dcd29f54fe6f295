"""Unit tests of admission control, fair queuing, budgets and the degradation ladder.

Pure logic, no cluster: a fake clock drives time. The playbook's worked examples are
checked as stated (../shared/playbook.md).
"""
from __future__ import annotations

import asyncio

import pytest

from pdserve.admission.budgets import TenantBudgets
from pdserve.admission.config import AdmissionSpec, AuthSpec, BudgetSpec, LadderSpec, TenantSpec
from pdserve.admission.controller import AdmissionController
from pdserve.admission.fleet_gate import FleetState, fleet_gate, kv_bytes_per_token, kv_fits
from pdserve.admission.ladder import DegradationLadder
from pdserve.admission.rejection import Rejection
from pdserve.admission.tenants import Tenant, TenantDirectory, hash_key
from pdserve.admission.wfq import FairShare
from pdserve.settings.cluster import ClusterConfig

GiB = 2 ** 30
LLAMA3_70B = {"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_size": 8192,
              "vocab_size": 128256}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tenant(name="t", cls="standard", weight=1.0, **budgets) -> Tenant:
    return Tenant.from_spec(TenantSpec(name=name, **{"class": cls}, weight=weight, budgets=BudgetSpec(**budgets)),
                            None)


def controller(capacity=4, clock=None, ladder=None, **spec) -> AdmissionController:
    return AdmissionController(AdmissionSpec(**spec), ladder or LadderSpec(), capacity, 1024, clock or Clock())


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- fair queuing
def test_wfq_worked_example_order():
    """A: weight 2, cost 800; B: weight 1, cost 8,400. B sends 10, A sends 4 (B's first).
    B's first runs (tie), then all four of A's (A's normalized cost reaches 3,200 / 2 = 1,600)
    before B's second."""
    a, b = tenant("A", weight=2), tenant("B", weight=1)
    order: list[str] = []

    async def scenario():
        c = controller(capacity=1, default_output_estimate=10_000)
        gate = asyncio.Event()

        async def one(t, prompt, out):
            ticket = await c.admit(t, "m", prompt, out)
            order.append(t.name)
            await gate.wait()
            c.finish(ticket, out)

        tasks = [asyncio.create_task(one(b, 8000, 400)) for _ in range(10)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one(a, 500, 300)) for _ in range(4)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return c

    c = run(scenario())
    assert order[:6] == ["B", "A", "A", "A", "A", "B"]
    assert order.count("B") == 10 and order.count("A") == 4
    assert c.fair.served("A") == pytest.approx(3200)


def test_wfq_reconciles_estimate_with_actual_output():
    f = FairShare(half_life_s=60, default_output=256)
    est = f.estimate("A", 1, input_tokens=100, max_tokens=1000, now=0)
    assert est == 356  # no history: the default output estimate
    f.enqueue("A", 1, 0)
    f.dispatch("A", 1, est, 0)
    f.complete("A", 1, est, actual=100 + 40, output_tokens=40, now=1)
    assert f.served("A") == 140  # the difference went back to the tenant
    assert f.estimate("A", 1, 100, 1000, 1) == 140  # history now says ~40 output tokens


def test_wfq_debt_decays_while_idle_only():
    f = FairShare(half_life_s=60)
    f.enqueue("A", 1, 0)
    f.dispatch("A", 1, 1000, 0)
    assert f.priority("A", 1, 120) == 1000  # busy: no decay
    f.complete("A", 1, 1000, 1000, 10, 120)
    assert f.priority("A", 1, 180) == pytest.approx(500)  # one idle minute halves it
    assert f.priority("A", 1, 240) == pytest.approx(250)


def test_aged_request_goes_ahead_of_fair_order():
    clock = Clock()
    heavy, light = tenant("heavy"), tenant("light")
    order = []

    async def scenario():
        c = controller(capacity=1, clock=clock, standard_max_queue_wait_s=10)
        first = await c.admit(light, "m", 10, 10)
        c.fair.dispatch("heavy", 1, 50_000, clock())  # heavy has a big debt...
        tasks = [asyncio.create_task(c.admit(heavy, "m", 10, 10))]
        await asyncio.sleep(0)
        clock.t += 6  # ...but its request has waited past half of max_queue_wait
        tasks.append(asyncio.create_task(c.admit(light, "m", 10, 10)))
        await asyncio.sleep(0)
        c.finish(first, 10)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        order.append(done.pop().result().tenant.name)
        for t in tasks:
            t.cancel()

    run(scenario())
    assert order == ["heavy"]


# ---------------------------------------------------------------- capacity and classes
def test_class_reserves_and_priority():
    async def scenario():
        c = controller(capacity=10, critical_reserve=0.3, sheddable_max_share=0.2, standard_max_queue_wait_s=0.05)
        std = [await c.admit(tenant("s"), "m", 10, 10) for _ in range(7)]
        # Standard holds its 70 %; the 8th Standard waits, then 503 + Retry-After.
        with pytest.raises(Rejection) as e:
            await c.admit(tenant("s"), "m", 10, 10)
        assert e.value.status == 503 and e.value.reason == "queue_timeout"
        assert e.value.headers() == {"retry-after": "1"}
        # Sheddable never waits: 429 at once.
        with pytest.raises(Rejection) as e:
            await c.admit(tenant("x", "sheddable"), "m", 10, 10)
        assert e.value.status == 429 and e.value.reason == "capacity"
        # Critical finds its reserve free.
        crit = [await c.admit(tenant("c", "critical"), "m", 10, 10) for _ in range(3)]
        assert c.slots.total == 10
        for t in std + crit:
            c.finish(t, 10)
        assert c.slots.total == 0 and c.queue_depth() == 0

    run(scenario())


def test_sheddable_share_is_capped():
    async def scenario():
        c = controller(capacity=10, sheddable_max_share=0.2)
        [await c.admit(tenant("x", "sheddable"), "m", 10, 10) for _ in range(2)]
        with pytest.raises(Rejection) as e:
            await c.admit(tenant("x", "sheddable"), "m", 10, 10)
        assert e.value.status == 429

    run(scenario())


def test_queued_request_cancelled_by_client_leaves_no_slot_or_budget():
    async def scenario():
        c = controller(capacity=1)
        t = tenant("s", tokens_per_min=10_000)
        first = await c.admit(t, "m", 10, 10)
        waiting = asyncio.create_task(c.admit(t, "m", 10, 10))
        await asyncio.sleep(0)
        assert c.queue_depth() == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert c.queue_depth() == 0
        c.finish(first, 10)
        assert c.slots.total == 0 and c.budgets.concurrent(t) == 0

    run(scenario())


# ---------------------------------------------------------------- fleet gate
def test_playbook_128k_sheddable_at_088_is_rejected():
    bpt = kv_bytes_per_token(LLAMA3_70B, "bfloat16")
    assert bpt == 327_680
    predicted = 131_072 * bpt
    assert predicted == 40 * GiB
    fleet = FleetState(kv_usage=0.88, kv_capacity_bytes=200 * GiB, healthy_replicas=4)  # 24 GiB free
    with pytest.raises(Rejection) as e:
        fleet_gate(AdmissionSpec(), "sheddable", predicted, fleet)
    assert e.value.status == 429 and e.value.reason == "kv_budget" and e.value.retry_after_s
    # Standard is not shed here: it waits in the queue until KV frees up (kv_fits says no for now)
    fleet_gate(AdmissionSpec(), "standard", predicted, fleet)
    assert not kv_fits(AdmissionSpec(), "standard", predicted, fleet)
    fleet_gate(AdmissionSpec(), "critical", predicted, fleet)  # Critical is not gated on KV
    assert kv_fits(AdmissionSpec(), "critical", predicted, fleet)
    # ...unless it could never fit under its ceiling at all: then 503 at once
    with pytest.raises(Rejection) as e:
        fleet_gate(AdmissionSpec(), "standard", 190 * GiB, fleet)
    assert e.value.status == 503
    fleet_gate(AdmissionSpec(), "sheddable", 1 * GiB, FleetState(kv_usage=0.5, kv_capacity_bytes=200 * GiB))


def test_standard_waits_for_kv_room_and_committed_kv_counts():
    async def scenario():
        c = controller(capacity=8, standard_max_queue_wait_s=5)
        c.kv_bytes_per_token = 1
        c.observe_fleet(FleetState(kv_usage=0.0, kv_capacity_bytes=1000, healthy_replicas=1), 0)
        first = await c.admit(tenant("s"), "m", 400, 400)  # commits 0.8 of the pool
        assert c._current_fleet().pressure == pytest.approx(0.8)
        with pytest.raises(Rejection) as e:  # sheddable: 0.8 + 0.2 > its ceiling, shed at once
            await c.admit(tenant("x", "sheddable"), "m", 100, 100)
        assert e.value.reason == "kv_budget"
        waiting = asyncio.create_task(c.admit(tenant("s"), "m", 100, 100))  # 1.0 > 0.9: waits
        await asyncio.sleep(0.01)
        assert c.queue_depth("standard") == 1 and not waiting.done()
        crit = await c.admit(tenant("c", "critical"), "m", 100, 100)  # the reserve is Critical's
        c.finish(crit, 100)
        c.finish(first, 400)  # KV comes back: the waiting request starts
        t = await asyncio.wait_for(waiting, 1)
        assert t.admitted_at is not None and c.committed_tokens == 200

    run(scenario())


def test_queue_depth_sheds_sheddable_only():
    fleet = FleetState(kv_usage=0.1, kv_capacity_bytes=GiB, waiting_per_replica=20, healthy_replicas=1)
    with pytest.raises(Rejection) as e:
        fleet_gate(AdmissionSpec(engine_queue_threshold=8), "sheddable", 1, fleet)
    assert e.value.reason == "queue_depth"
    fleet_gate(AdmissionSpec(engine_queue_threshold=8), "standard", 1, fleet)


# ---------------------------------------------------------------- budgets
def test_budget_exhaustion_and_refill():
    b = TenantBudgets()
    t = tenant("t", requests_per_min=2, tokens_per_min=600)
    b.charge(t, 100, now=0)
    b.charge(t, 100, now=0)
    with pytest.raises(Rejection) as e:
        b.charge(t, 100, now=0)
    assert e.value.status == 429 and e.value.reason == "budget_requests"
    assert e.value.retry_after_s == pytest.approx(30)  # one request per 30 s refills
    b.charge(t, 100, now=30)  # half a minute refilled one request
    with pytest.raises(Rejection):
        b.charge(t, 100, now=30)
    b.charge(t, 100, now=60)
    assert b.concurrent(t) == 4
    for _ in range(4):
        b.release(t, 100, 100, 60)
    assert b.concurrent(t) == 0


def test_tokens_budget_refunds_unused_tokens():
    b = TenantBudgets()
    t = tenant("t", tokens_per_min=600)
    b.charge(t, 500, now=0)  # input 100 + max_tokens 400
    with pytest.raises(Rejection) as e:
        b.charge(t, 500, now=0)
    assert e.value.reason == "budget_tokens" and e.value.retry_after_s == pytest.approx(40)
    b.release(t, 500, 150, now=0)  # only 50 output tokens were generated: 350 come back
    b.charge(t, 400, now=0)
    with pytest.raises(Rejection) as e:
        b.charge(t, 601, now=0)
    assert e.value.status == 400  # can never fit the budget: a size error, not a retry


def test_concurrency_budget():
    b = TenantBudgets()
    t = tenant("t", concurrent_requests=1)
    b.charge(t, 1, 0)
    with pytest.raises(Rejection) as e:
        b.charge(t, 1, 0)
    assert e.value.reason == "budget_concurrency"
    b.release(t, 1, 1, 0)
    b.charge(t, 1, 0)


def test_rejected_request_gets_its_tokens_back():
    async def scenario():
        c = controller(capacity=4)
        t = tenant("t", requests_per_min=10, tokens_per_min=1000, max_context=100)
        with pytest.raises(Rejection) as e:
            await c.admit(t, "m", 90, 20)
        assert e.value.status == 400 and e.value.reason == "oversize"
        u = c.budgets._of(t)
        assert c.budgets.concurrent(t) == 0 and u.tokens.level == 1000  # tokens and the slot come back
        assert u.requests.level == 9  # the attempt still counts against requests/min (no free hammering)
    run(scenario())


# ---------------------------------------------------------------- auth
def test_auth_keys_to_tenants():
    spec = AuthSpec(enabled=True, tenants=[
        TenantSpec(name="a", key_sha256=[hash_key("key-a")], models=["tiny"]),
        TenantSpec(name="b", **{"class": "critical"}, key_sha256=[hash_key("key-b")])])
    d = TenantDirectory(spec, salt_secret="s")
    assert d.authenticate({"authorization": "Bearer key-a"}).name == "a"
    assert d.authenticate({"authorization": "Bearer key-b"}).priority_class == "critical"
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic key-a"}):
        with pytest.raises(Rejection) as e:
            d.authenticate(headers)
        assert e.value.status == 401
    with pytest.raises(Rejection) as e:
        d.authorize_model(d.authenticate({"authorization": "Bearer key-a"}), "other")
    assert e.value.status == 403
    salts = {t.cache_salt for t in d.all()}
    assert len(salts) == 2 and None not in salts


def test_auth_off_is_one_default_tenant_without_salt():
    d = TenantDirectory(AuthSpec(), "s")
    t = d.authenticate({})
    assert t.name == "default" and t.cache_salt is None


# ---------------------------------------------------------------- ladder
def test_ladder_steps_up_and_recovers_one_rung_per_interval():
    lad = DegradationLadder(LadderSpec(sustain_s=1, stable_interval_s=10))
    assert lad.observe(0.5, 0, now=0) == 0
    assert lad.observe(0.86, 0, now=1) == 0  # not yet sustained
    assert lad.observe(0.86, 0, now=2) == 1
    assert lad.observe(0.98, 0, now=3) == 1
    assert lad.observe(0.98, 0, now=4) == 4  # straight to the rung the signal calls for
    # load stops: one rung per stable interval, no jump to 0
    assert lad.observe(0.1, 0, now=5) == 4
    assert lad.observe(0.1, 0, now=14) == 4
    assert lad.observe(0.1, 0, now=15) == 3
    assert lad.observe(0.1, 0, now=20) == 3
    assert lad.observe(0.1, 0, now=25) == 2
    # hysteresis: a blip back over a lower threshold does not reset the ladder upward
    assert lad.observe(0.91, 0, now=26) == 2
    assert lad.observe(0.1, 0, now=27) == 2
    assert lad.observe(0.1, 0, now=37) == 1
    assert lad.observe(0.1, 0, now=47) == 0


def test_ladder_preemption_storm_means_critical_only():
    lad = DegradationLadder(LadderSpec(sustain_s=0, preemption_storm_per_s=2))
    assert lad.observe(0.3, 5.0, now=0) == 4
    a = lad.actions()
    assert a.shed_sheddable and a.shed_standard


def test_ladder_actions_follow_feature_flags():
    lad = DegradationLadder(LadderSpec(degraded_target="prefill", cap_standard=False, standard_max_tokens_cap=64))
    lad.force(3)
    a = lad.actions()
    assert a.shed_sheddable and a.standard_max_tokens is None and a.degrade_standard and not a.shed_standard
    lad.force(2)
    assert lad.actions().standard_max_tokens is None
    lad = DegradationLadder(LadderSpec(degraded_target="off"))
    lad.force(3)
    assert not lad.actions().degrade_standard and lad.actions().standard_max_tokens == 512
    with pytest.raises(ValueError):
        lad.force(5)


def test_forced_rung_holds_then_auto_recovers_stepwise():
    lad = DegradationLadder(LadderSpec(stable_interval_s=10))
    lad.force(4)
    assert lad.observe(0.0, 0, now=0) == 4
    lad.auto()
    assert lad.observe(0.0, 0, now=1) == 4
    assert lad.observe(0.0, 0, now=11) == 3


def test_ladder_actions_on_classes():
    async def scenario():
        c = controller(capacity=8, ladder=LadderSpec(degraded_target="prefill", standard_max_tokens_cap=64))
        c.ladder.force(1)
        with pytest.raises(Rejection) as e:
            await c.admit(tenant("x", "sheddable"), "m", 10, 10)
        assert (e.value.status, e.value.reason) == (429, "ladder") and e.value.headers()
        t = await c.admit(tenant("s"), "m", 10, 500)
        assert t.max_tokens == 500 and t.capped_from is None
        c.ladder.force(2)
        t = await c.admit(tenant("s"), "m", 10, 500)
        assert (t.max_tokens, t.capped_from, t.degraded_target) == (64, 500, None)
        c.ladder.force(3)
        t = await c.admit(tenant("s"), "m", 10, 500)
        assert t.degraded_target == "prefill" and t.max_tokens == 64
        t = await c.admit(tenant("c", "critical"), "m", 10, 500)
        assert t.degraded_target is None and t.max_tokens == 500
        c.ladder.force(4)
        with pytest.raises(Rejection) as e:
            await c.admit(tenant("s"), "m", 10, 10)
        assert e.value.status == 503
        await c.admit(tenant("c", "critical"), "m", 10, 10)

    run(scenario())


# ---------------------------------------------------------------- config errors fail at startup
BASE = {"mode": "pd", "prefill": {"cpu_cores": ["0"]}, "decode": {"cpu_cores": ["1"]}}


@pytest.mark.parametrize("patch, message", [
    ({"auth": {"enabled": True, "tenants": [{"name": "a"}]}}, "no tenant has a key"),
    ({"auth": {"tenants": [{"name": "a", "key_sha256": ["abc"]}]}}, "not a lowercase 64-hex"),
    ({"auth": {"tenants": [{"name": "a", "budgets": {"requests_per_min": 0}}]}}, "requests_per_min"),
    ({"auth": {"tenants": [{"name": "a", "budgets": {"tokens_per_min": -5}}]}}, "tokens_per_min"),
    ({"auth": {"tenants": [{"name": "a", "budgets": {"bogus": 1}}]}}, "bogus"),
    ({"auth": {"tenants": [{"name": "a", "class": "vip"}]}}, "class"),
    ({"auth": {"tenants": [{"name": "a", "weight": 0}]}}, "weight"),
    ({"auth": {"tenants": [{"name": "a"}, {"name": "a"}]}}, "appear twice"),
    ({"auth": {"tenants": [{"name": "a", "key_sha256": [hash_key("k")]},
                           {"name": "b", "key_sha256": [hash_key("k")]}]}}, "given to both"),
    ({"auth": {"tenants": [{"name": "a", "models": []}]}}, "'models' is empty"),
    ({"auth": {"keys_file": "/nonexistent/keys.yaml"}}, "file not found"),
    ({"admission": {"rules": ["size", "budgets"]}}, "playbook's order"),
    ({"admission": {"rules": ["budgets", "vibes"]}}, "unknown rules"),
    ({"admission": {"critical_reserve": 0.9, "sheddable_max_share": 0.5}}, "sheddable_max_share"),
    ({"ladder": {"stop_sheddable_above": 0.95, "cap_standard_above": 0.9}}, "must rise"),
    ({"slo": {"classes": {"gold": {"ttft_ms": 1}}}}, "unknown classes"),
    ({"engine": {"kv_cache_blocks": 10}}, "cannot hold one request"),
])
def test_bad_policy_config_fails_at_startup(patch, message):
    with pytest.raises(ValueError) as e:
        ClusterConfig.model_validate({**BASE, **patch})
    assert message in str(e.value)


def test_keys_file(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - {{tenant: a, sha256: {hash_key('from-file')}}}\n")
    spec = AuthSpec(enabled=True, tenants=[TenantSpec(name="a")], keys_file=str(f))
    assert TenantDirectory(spec, "s").authenticate({"authorization": "Bearer from-file"}).name == "a"
    f.write_text(f"keys:\n  - {{tenant: zz, sha256: {hash_key('x')}}}\n")
    with pytest.raises(ValueError, match="unknown tenant 'zz'"):
        AuthSpec(enabled=True, tenants=[TenantSpec(name="a")], keys_file=str(f))


def test_shipped_tenants_config_has_the_demo_keys():
    from pathlib import Path

    from pdserve.settings.cluster import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpu-pd-tenants.yaml")
    d = TenantDirectory(cfg.auth, "s")
    got = {k: d.authenticate({"authorization": f"Bearer demo-{k}"}).priority_class
           for k in ("critical", "standard", "sheddable")}
    assert got == {"critical": "critical", "standard": "standard", "sheddable": "sheddable"}


def test_several_sequences_are_charged_and_committed_for_each_sequence():
    """n choices (or a prompt list) generate several sequences of up to max_tokens each:
    budgets, the committed KV and the tenant's size limit count every one of them."""
    async def scenario():
        c = controller(capacity=4)
        t = tenant("t", tokens_per_min=1000)
        ticket = await c.admit(t, "m", 100, 200, sequences=4)  # 100 + 4 x 200 = 900 of 1,000
        assert ticket.charged_tokens == 900 and c.committed_tokens == 900
        with pytest.raises(Rejection) as e:  # 900 more would pass as one sequence, not as four
            await c.admit(t, "m", 100, 50, sequences=4)
        assert e.value.reason == "budget_tokens"
        c.finish(ticket, 800)
        assert c.committed_tokens == 0
        with pytest.raises(Rejection) as e:  # 16 + 2 x 40 > the tenant's 64 tokens per request
            await c.admit(tenant("s", max_context=64), "m", 16, 40, sequences=2)
        assert e.value.status == 400
        await c.admit(tenant("s", max_context=64), "m", 16, 40)

    run(scenario())
