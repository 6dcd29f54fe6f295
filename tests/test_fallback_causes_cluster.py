"""The prefill-side fallback causes on the real cluster (the 'pdgrpc' app: 4 s KV lease).

Each failure is produced in the processes themselves, never in the router's logic:

* ``no_prefill_replica``: the prefill replica's process is stopped (SIGSTOP) until the
  router's load polls mark it unhealthy; the next request has no prefill replica to pick.
* ``prefill_replica_lost``: the prefill replica's process is stopped just before a request
  arrives; its prefill leg waits on a silent replica until the load polls give it up.
* ``prefill_timeout``: the prefill *engine core* is stopped while its replica goes on
  answering load polls: the leg outlives ``router.prefill_timeout_s`` (10 s in the test cluster).
* ``prefill_error``: the prefill engine core is stopped so the leg is in flight, then the
  router's direct connection to the prefill replica is destroyed (``ss -K``): a dropped
  connection before any answer.

Every request must come back 200 with the greedy answer the monolithic app gives, labelled
``x-pdserve-path: fallback`` with its cause, and counted in ``pdserve_fallback_total``.
Each test resumes what it stopped and waits for P/D to serve again, with no KV left on the
prefill engine, so the tests after it find the cluster as it was.

* ``prefill_returned_no_kv_params``: the engines' chaos switch ``drop_kv_params``
  (``pdserve chaos faults --drop-kv-params``) makes the prefill engine's gRPC connector finish
  each leg without handing off its KV, as a prefill engine without a working connector does.
  vLLM 0.32's NIXL connector and ours otherwise hand off every finished leg (length-capped and
  stopped alike), so a real engine needs that switch to produce this cause.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from helpers import chat_body, metric_samples, post, status, wait_for

pytestmark = pytest.mark.cluster

APP = "pdgrpc"
PROMPT = "Fallback cause {}: tell me how a request is served when prefill fails. " + "cache block " * 20
MAX_TOKENS = 24


def _prefill(url: str) -> dict:
    (replica,) = status(url)["pools"]["prefill"]
    return replica


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/comm") as f:
                cmd = f"{f.read().strip()} {cmd}"
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(entry), cmd))
    return out


def _engine_core_pid(replica_pid: int) -> int:
    """The replica's engine core: its one child that is not multiprocessing's resource tracker.
    Not found by process title: vLLM's children do not always carry theirs."""
    kids = _children(replica_pid)
    cores = [pid for pid, cmd in kids if "resource_tracker" not in cmd]
    assert len(cores) == 1, f"no single vLLM engine core among the children of {replica_pid}: {kids}"
    return cores[0]


def _expected(mono_url: str, body: dict) -> list[int]:
    r = post(mono_url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _fallbacks(url: str, cause: str) -> float:
    return metric_samples(url).get(f'pdserve_fallback_total{{cause="{cause}"}}', 0.0)


def _assert_fallback(r, cause: str, expected: list[int]) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "fallback", dict(r.headers)
    assert r.headers["x-pdserve-fallback-cause"] == cause, dict(r.headers)
    assert "x-pdserve-decode-replica" in r.headers, dict(r.headers)  # served whole on decode
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["token_ids"] == expected


def _back_to_pd(url: str, old_pid: int) -> None:
    """P/D serves again from the same prefill replica (nothing was restarted), and the
    prefill engine holds no KV (a leg that ran after its process resumed held a 4 s lease)."""
    wait_for(lambda: _prefill(url)["healthy"], 30, "the prefill replica healthy again")
    assert _prefill(url)["pid"] == old_pid  # resumed, not replaced

    def pd_again():
        r = post(url, "/v1/chat/completions", chat_body("back to P/D?", max_tokens=2))
        assert r.status_code == 200, r.text
        return r.headers.get("x-pdserve-path") == "pd"

    wait_for(pd_again, 30, "traffic back on P/D")
    wait_for(lambda: _prefill(url)["kv_cache_usage"] == 0.0, 30, "prefill KV usage back to 0")


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by join()
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout: float):
        t.join(timeout)
        assert not t.is_alive(), f"request still running after {timeout}s"
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def test_no_prefill_replica(clusters):
    url = clusters.grpc_url
    body = chat_body(PROMPT.format("no replica"), MAX_TOKENS)
    expected = _expected(clusters.mono_url, body)
    before = _fallbacks(url, "no_prefill_replica")
    pid = _prefill(url)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # two load-poll timeouts (2 s each) mark it unhealthy; Ray Serve's health check
        # (period 10 s, timeout 30 s) does not replace it in that time
        wait_for(lambda: not _prefill(url)["healthy"], 20, "the stopped prefill replica marked unhealthy", 0.2)
        r = post(url, "/v1/chat/completions", body)
    finally:
        os.kill(pid, signal.SIGCONT)
    _assert_fallback(r, "no_prefill_replica", expected)
    assert "x-pdserve-prefill-replica" not in r.headers  # no prefill leg was tried
    assert _fallbacks(url, "no_prefill_replica") == before + 1
    _back_to_pd(url, pid)


def test_prefill_replica_lost(clusters):
    url = clusters.grpc_url
    body = chat_body(PROMPT.format("replica lost"), MAX_TOKENS)
    expected = _expected(clusters.mono_url, body)
    before = _fallbacks(url, "prefill_replica_lost")
    replica = _prefill(url)
    assert replica["healthy"]
    pid = replica["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The router still counts it healthy (it takes two poll timeouts to notice): the
        # prefill leg goes to the silent replica and waits until the polls give it up
        # (the cause says so: a leg given up by the 10 s prefill timeout is prefill_timeout).
        r = post(url, "/v1/chat/completions", body)
    finally:
        os.kill(pid, signal.SIGCONT)
    _assert_fallback(r, "prefill_replica_lost", expected)
    assert r.headers["x-pdserve-prefill-replica"] == replica["replica"]  # the leg was tried there
    assert _fallbacks(url, "prefill_replica_lost") == before + 1
    _back_to_pd(url, pid)


def test_prefill_timeout(clusters):
    url = clusters.grpc_url
    timeout_s = clusters.grpc_cfg.router.prefill_timeout_s
    body = chat_body(PROMPT.format("timeout"), MAX_TOKENS)
    expected = _expected(clusters.mono_url, body)
    before = _fallbacks(url, "prefill_timeout")
    replica = _prefill(url)
    core = _engine_core_pid(replica["pid"])
    os.kill(core, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = post(url, "/v1/chat/completions", body)
        waited = time.monotonic() - t0
        # the replica answered its load polls all along: never lost, only slow
        assert _prefill(url)["healthy"]
    finally:
        os.kill(core, signal.SIGCONT)
    _assert_fallback(r, "prefill_timeout", expected)
    assert r.headers["x-pdserve-prefill-replica"] == replica["replica"]
    assert waited >= timeout_s, waited
    assert _fallbacks(url, "prefill_timeout") == before + 1
    _back_to_pd(url, replica["pid"])


def _established_to(host: str, port: int) -> list[str]:
    out = subprocess.run(["ss", "-Htn", "state", "established", "dst", f"{host}:{port}"],
                         capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line.strip()]


def _can_destroy_sockets() -> bool:
    """Whether ``ss -K`` may destroy a TCP socket here (root and a kernel with sock_destroy)."""
    import socket

    if shutil.which("ss") is None:
        return False
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c:
            a, _ = srv.accept()
            with a:
                subprocess.run(["ss", "-K", "dst", f"127.0.0.1:{port}"], capture_output=True, timeout=10)
                try:
                    c.send(b"x")
                    c.settimeout(2)
                    return c.recv(1) == b""
                except OSError:
                    return True


def test_prefill_error_when_the_prefill_connection_drops(clusters):
    if not _can_destroy_sockets():
        pytest.skip("ss -K cannot destroy TCP sockets here (needs root and CONFIG_INET_DIAG_DESTROY)")
    from ray import serve

    url = clusters.grpc_url
    body = chat_body(PROMPT.format("error"), MAX_TOKENS)
    expected = _expected(clusters.mono_url, body)
    before = _fallbacks(url, "prefill_error")
    replica = _prefill(url)
    load = serve.get_deployment_handle("prefill", app_name=APP).load.remote().result(timeout_s=30)
    assert load["replica"] == replica["replica"] and load.get("stream"), load
    host, port = load["stream"]["host"], load["stream"]["port"]
    # The router may hold a spare connection to the replica (engine/direct_stream.py), which the
    # leg takes; either way a new one opens as the leg starts. The engine is stopped, so the leg
    # then waits on its connection, which the kill below cuts with every other one to the replica.
    spares = set(_established_to(host, port))
    core = _engine_core_pid(replica["pid"])
    os.kill(core, signal.SIGSTOP)
    try:
        join = _in_thread(lambda: post(url, "/v1/chat/completions", body))
        wait_for(lambda: bool(set(_established_to(host, port)) - spares), 10, "the prefill leg's direct connection",
                 0.05)
        time.sleep(1.0)  # the leg's own connection, where it found no spare, is up long before this
        killed = subprocess.run(["ss", "-K", "dst", f"{host}:{port}"], capture_output=True, text=True,
                                timeout=10)
        assert killed.returncode == 0, killed.stderr
        r = join(60)
    finally:
        os.kill(core, signal.SIGCONT)
    _assert_fallback(r, "prefill_error", expected)
    assert r.headers["x-pdserve-prefill-replica"] == replica["replica"]
    assert _fallbacks(url, "prefill_error") == before + 1
    _back_to_pd(url, replica["pid"])


def test_prefill_returned_no_kv_params(clusters):
    from pdserve.cluster.cli import main

    url = clusters.grpc_url
    body = chat_body(PROMPT.format("no kv params"), MAX_TOKENS)
    expected = _expected(clusters.mono_url, body)
    before = _fallbacks(url, "prefill_returned_no_kv_params")
    replica = _prefill(url)
    assert main(["chaos", "--url", url, "faults", "--drop-kv-params"]) == 0
    try:
        r = post(url, "/v1/chat/completions", body)
    finally:
        assert main(["chaos", "--url", url, "heal-links"]) == 0
    _assert_fallback(r, "prefill_returned_no_kv_params", expected)
    assert r.headers["x-pdserve-prefill-replica"] == replica["replica"]  # the leg ran and came back
    assert _fallbacks(url, "prefill_returned_no_kv_params") == before + 1
    # the leg's blocks were freed when it finished, not leased: nothing waits for a lease to expire
    _back_to_pd(url, replica["pid"])
