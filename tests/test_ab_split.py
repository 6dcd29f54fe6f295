"""The online A/B split: sticky assignment maths (unit) and the live split on a P/D cluster."""
from __future__ import annotations

import httpx
import pytest

from pdserve.router.ab_split import TrafficSplit
from pdserve.router.config import DEV_ADMIN_KEY
from pdserve.settings.cluster import ClusterConfig
from tests.helpers import chat_body, metric_samples, post


def test_fraction_and_stickiness():
    split = TrafficSplit(0.3, "x-session-id", salt="s")
    arms = {f"session-{i}": split.arm({"x-session-id": f"session-{i}"}, {}) for i in range(4000)}
    share = sum(a == "monolithic" for a in arms.values()) / len(arms)
    assert abs(share - 0.3) < 0.03
    for key, arm in list(arms.items())[:200]:  # the same session always lands in the same arm
        assert split.arm({"x-session-id": key}, {}) == arm
    assert split.arm({}, {"user": "session-7"}) == arms["session-7"]  # the OpenAI user field works too
    assert TrafficSplit(0.0, "x-session-id", "s").arm({"x-session-id": "a"}, {}) == "pd"
    assert TrafficSplit(1.0, "x-session-id", "s").arm({}, {}) == "monolithic"


def test_growing_the_fraction_only_moves_sessions_into_the_monolithic_arm():
    small, big = TrafficSplit(0.1, "h", "s"), TrafficSplit(0.4, "h", "s")
    for i in range(500):
        if small.arm({"h": str(i)}, {}) == "monolithic":
            assert big.arm({"h": str(i)}, {}) == "monolithic"


def test_bad_fractions():
    with pytest.raises(ValueError):
        TrafficSplit(1.5, "h", "s")
    with pytest.raises(ValueError):
        TrafficSplit(0.1, "h", "s").set_fraction("half")
    with pytest.raises(ValueError, match="needs mode 'pd'"):
        ClusterConfig.model_validate({"mode": "monolithic", "monolithic": {"cpu_cores": ["0"]},
                                      "ab_split": {"monolithic_fraction": 0.2}})


@pytest.mark.cluster
def test_live_split_is_sticky_with_separate_metrics(clusters):
    url = clusters.tenants_base
    admin = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
    key = {"Authorization": "Bearer demo-critical"}
    r = post(url, "/admin/ab", {"monolithic_fraction": 0.3}, headers=admin)
    assert r.status_code == 200 and r.json()["monolithic_fraction"] == 0.3
    bad = post(url, "/admin/ab", {"monolithic_fraction": 3}, headers=admin)
    assert bad.status_code == 400
    expected = TrafficSplit(0.3, "x-session-id", salt=f"pdserve-ab:{clusters.tenants_cfg.name}")
    before = metric_samples(url)
    seen: dict[str, set[str]] = {}
    outputs: dict[str, set[str]] = {"pd": set(), "monolithic": set()}
    try:
        for i in range(60):
            for _ in range(2):
                sid = f"ab-session-{i}"
                resp, chunks = _stream(url, sid, key)
                assert resp.status_code == 200
                arm = resp.headers["x-pdserve-arm"]
                assert resp.headers["x-pdserve-path"] == ("monolithic" if arm == "monolithic" else "pd")
                seen.setdefault(sid, set()).add(arm)
                outputs[arm].add(chunks)
    finally:
        post(url, "/admin/ab", {"monolithic_fraction": 0.0}, headers=admin)
    assert all(len(arms) == 1 for arms in seen.values()), "a session changed arms"
    for sid, arms in seen.items():
        assert arms == {expected.arm({"x-session-id": sid}, {})}
    share = sum("monolithic" in a for a in seen.values()) / len(seen)
    assert abs(share - 0.3) < 0.15, share
    # both arms give the same greedy answer: the split changes where the KV is computed, not the output
    assert len(outputs["pd"]) == len(outputs["monolithic"]) == 1 and outputs["pd"] == outputs["monolithic"]
    after = metric_samples(url)
    n_mono = sum(2 for a in seen.values() if "monolithic" in a)
    n_pd = len(seen) * 2 - n_mono
    for arm, n in (("monolithic", n_mono), ("pd", n_pd)):
        key = f'pdserve_ab_requests_total{{arm="{arm}"}}'
        assert after.get(key, 0.0) - before.get(key, 0.0) == n
    key = 'pdserve_ttft_seconds_count{class="critical",path="monolithic"}'
    got_mono = after.get(key, 0.0) - before.get(key, 0.0)
    assert got_mono == n_mono


def _stream(url: str, sid: str, key: dict) -> tuple[httpx.Response, str]:
    import json

    text = []
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", headers={**key, "x-session-id": sid},
                      json=chat_body("same prompt for both arms", max_tokens=4, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:]).get("choices", []):
                        text.append(ch.get("delta", {}).get("content") or "")
    return r, "".join(text)
