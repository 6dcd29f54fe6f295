"""Little's-Law autoscaling: the policy's arithmetic and cooldowns (unit), and the live mono
pool scaling up under load and back down after it (cluster)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest

from pdserve.cluster.autoscaling import LittlesLawPolicy, autoscaling_config, pool_signal
from pdserve.engine.config import AutoscalingSpec, PoolSpec
from pdserve.engine.little_meter import LittleMeter
from tests.helpers import TIMEOUT, chat_body


def policy(**kw) -> LittlesLawPolicy:
    args = dict(c_knee=24, safety=0.75, min_replicas=1, max_replicas=8, upscale_cooldown_s=5,
                downscale_cooldown_s=30)
    args.update(kw)
    return LittlesLawPolicy(**args)


def ctx(rates: dict, waits: dict, target: int, now: float, state=None):
    def series(values):  # Ray's raw metrics: per replica, a list of timestamped points (latest last)
        return {r: [SimpleNamespace(timestamp=now - 1, value=-1.0), SimpleNamespace(timestamp=now, value=v)]
                for r, v in values.items()}

    return SimpleNamespace(raw_metrics={"arrival_rps": series(rates), "w_s": series(waits)}, current_time=now,
                           target_num_replicas=target, policy_state=state or {}, deployment_name="decode")


def test_playbook_example_through_the_policy():
    # 6 req/s over three replicas, W = 12 s, C = 24, safety 0.75 -> 4 replicas
    target, state = policy()(ctx({"a": 2.0, "b": 2.0, "c": 2.0}, {"a": 12.0, "b": 12.0, "c": 12.0}, 3, 100.0))
    assert target == 4 and state["lam"] == 6.0 and state["w"] == 12.0 and state["last_change"] == 100.0


def test_w_is_arrival_weighted():
    assert pool_signal({"arrival_rps": {"a": 3.0, "b": 1.0}, "w_s": {"a": 2.0, "b": 6.0}}) == (4.0, 3.0)
    assert pool_signal(None) == (0.0, 0.0)


def test_cooldowns_and_bounds():
    p = policy(max_replicas=3)
    assert p.decide(lam=100, w=10, current=1, now=0, last_change=None) == 3  # clamped to max
    assert p.decide(lam=100, w=10, current=1, now=3, last_change=0) == 1  # inside the upscale cooldown
    assert p.decide(lam=0, w=0, current=3, now=20, last_change=0) == 3  # inside the downscale cooldown
    assert p.decide(lam=0, w=0, current=3, now=31, last_change=0) == 1  # down to min


def test_serve_config_carries_the_policy():
    pool = PoolSpec(replicas=1, cpu_cores=["0", "1"],
                    autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=2, c_knee=4))
    cfg = autoscaling_config(pool)
    assert cfg["policy"]["policy_function"] == "pdserve.cluster.autoscaling:LittlesLawPolicy"
    assert cfg["policy"]["policy_kwargs"]["c_knee"] == 4 and cfg["max_replicas"] == 2
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**cfg)  # Ray accepts it


def test_replicas_must_fit_the_bounds_and_the_cores():
    with pytest.raises(ValueError, match="within autoscaling bounds"):
        PoolSpec(replicas=3, autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=2, c_knee=4))
    with pytest.raises(ValueError, match="below min_replicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2, c_knee=4)


def test_meter_measures_lambda_and_w():
    now = [0.0]
    m = LittleMeter(window_s=10, clock=lambda: now[0])
    for i in range(5):
        now[0] = i * 1.0
        t = m.start()
        now[0] += 0.5
        m.finish(t)
    s = m.stats()
    assert s["arrival_rps"] == 0.5 and s["w_s"] == pytest.approx(0.5) and s["inflight"] == 0
    now[0] = 100
    assert m.stats()["arrival_rps"] == 0


# ---------------------------------------------------------------- live cluster
def _mono_replicas() -> int:
    from ray import serve

    d = serve.status().applications["mono"].deployments["monolithic"]
    return sum(n for state, n in d.replica_states.items()
               if str(getattr(state, "value", state)) in ("STARTING", "UPDATING", "RECOVERING", "RUNNING"))


async def _drive(url: str, stop: asyncio.Event, concurrency: int) -> int:
    done = 0
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        async def worker(k):
            nonlocal done
            i = 0
            while not stop.is_set():
                r = await client.post(url + "/v1/chat/completions",
                                      json=chat_body(f"autoscale {k} {i}", max_tokens=48))
                assert r.status_code == 200, r.text
                done += 1
                i += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done


@pytest.mark.cluster
def test_mono_pool_scales_up_under_load_and_back_down(clusters):
    from tests.conftest import MONO_AUTOSCALING

    url = clusters.mono_url
    assert _mono_replicas() == 1
    seen = []

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(_drive(url, stop, concurrency=6))
        deadline = time.time() + 60
        while time.time() < deadline and _mono_replicas() < 2:
            seen.append(_mono_replicas())
            await asyncio.sleep(0.5)
        seen.append(_mono_replicas())
        stop.set()
        return await load

    served = asyncio.run(scenario())
    # L = λW ≈ 6 streams in flight, usable per replica c_knee x safety = 2.25 -> three replicas,
    # clamped to the two core sets: the pool scales up...
    assert seen[-1] == 2, seen
    text = httpx.get(url + "/metrics").text
    # ...and once the load stops (λ -> 0 after the meter's window, then the downscale cooldown),
    # back down to the minimum.
    deadline = time.time() + MONO_AUTOSCALING["window_s"] + MONO_AUTOSCALING["downscale_cooldown_s"] + 60
    while time.time() < deadline and _mono_replicas() != 1:
        time.sleep(1)
    assert _mono_replicas() == 1
    assert served > 0 and "pdserve_autoscaler_target_replicas" in text
