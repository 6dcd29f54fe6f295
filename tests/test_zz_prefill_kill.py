"""Killing the prefill replica's process: requests keep being answered, by fallback.

Runs last (file name) because it takes the prefill pool down until Ray Serve restarts it.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import chat_body, post, status

pytestmark = pytest.mark.cluster


def test_prefill_process_killed_requests_fall_back_then_return_to_pd(clusters):
    (rep,) = status(clusters.pd_url)["pools"]["prefill"]
    body = chat_body("Fallback must give the same greedy answer as monolithic serving.", max_tokens=12)
    expected = post(clusters.mono_url, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]

    os.kill(rep["pid"], signal.SIGKILL)
    paths = []
    t_kill = time.time()
    for _ in range(5):
        t = time.time()
        r = post(clusters.pd_url, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        assert time.time() - t < 15, "a request waited on the dead prefill replica"
        paths.append((r.headers["x-pdserve-path"], r.headers.get("x-pdserve-fallback-cause")))
    assert paths[0][0] == "fallback" and paths[0][1], paths

    # Ray Serve restarts the replica; traffic returns to P/D without intervention.
    deadline = t_kill + 240
    while time.time() < deadline:
        r = post(clusters.pd_url, "/v1/chat/completions", body)
        assert r.status_code == 200
        if r.headers["x-pdserve-path"] == "pd":
            assert r.json()["choices"][0]["token_ids"] == expected
            break
        time.sleep(2)
    else:
        pytest.fail("traffic never returned to P/D after the prefill replica restarted")
    (new,) = status(clusters.pd_url)["pools"]["prefill"]
    assert new["pid"] != rep["pid"]
