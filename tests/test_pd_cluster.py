"""The P/D cluster on real vLLM engines: KV really moves, and output equals monolithic."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import chat_body, expected_kv_mode, pool_totals, post, set_kv_faults, status, stream_chat

pytestmark = pytest.mark.cluster

_WORDS = ("prefill decode cache block transfer engine router replica request latency throughput goodput "
          "stream queue budget tenant priority cluster fallback link").split()


def _prompt(i: int, n_words: int) -> str:
    words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(n_words)]
    return f"Request {i}: " + " ".join(words)


# 24 prompts from a few tokens to ~20 blocks of 32 tokens.
PROMPT_WORDS = [1, 2, 4, 8, 12, 16, 20, 28, 36, 48, 64, 80, 100, 128, 160, 200, 240, 300, 360, 420, 480, 520, 560, 600]


def _token_ids(resp) -> list[int]:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"]


# grpc: the decode engine copies the KV out of the prefill process by same-host reference (where
# the kernel lets it read a sibling process; see expected_kv_mode);
# grpc-inline: the bytes travel in the gRPC stream, as they must between hosts.
@pytest.mark.parametrize("transport", ["nixl", "grpc", "grpc-inline"])
def test_pd_greedy_output_equals_monolithic_and_kv_moved(clusters, transport):
    url = clusters.pd_url if transport == "nixl" else clusters.grpc_url
    offset = 1000 if transport == "grpc-inline" else 0  # prompts no engine has cached yet
    prompts = [_prompt(offset + i, n) for i, n in enumerate(PROMPT_WORDS)]
    hits_before = pool_totals(url, "decode", "external_hit_tokens_total")
    bytes_before = pool_totals(url, "decode", "kv_transfer_bytes_total")
    transfers_before = pool_totals(url, "decode", "kv_transfers_total")
    same_host_before = pool_totals(url, "decode", "kv_same_host_transfers_total") if offset == 0 else 0

    pd, prompt_tokens, moved_by_pull = [], [], []
    if transport == "grpc-inline":
        set_kv_faults("pdgrpc", "prefill", {"force_inline": True})
    try:
        for p in prompts:
            r = post(url, "/v1/chat/completions", chat_body(p))
            assert r.headers["x-pdserve-path"] == "pd", r.headers
            if transport != "nixl":
                kv = r.headers["x-pdserve-kv-transfer"]
                moved_by_pull.append(int(kv.split("bytes=")[1].split(";")[0]))
                want = "mode=inline" if transport == "grpc-inline" else f"mode={expected_kv_mode()}"
                assert want in kv or not moved_by_pull[-1], r.headers
            pd.append(_token_ids(r))
            prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
    finally:
        if transport == "grpc-inline":
            set_kv_faults("pdgrpc", "prefill", None)
    mono = []
    for p in prompts:
        r = post(clusters.mono_url, "/v1/chat/completions", chat_body(p))
        assert r.headers["x-pdserve-path"] == "monolithic"
        mono.append(_token_ids(r))

    assert min(prompt_tokens) < 32 < 16 * 32 < max(prompt_tokens)  # one block to many
    for i, (a, b) in enumerate(zip(pd, mono)):
        assert len(a) == 16
        assert a == b, f"prompt {i} ({prompt_tokens[i]} tokens): P/D {a} != monolithic {b}"

    # Proof that decode loaded the prompts' KV from prefill instead of recomputing it:
    # its connector reported the prompt tokens as external hits and moved the bytes.
    hits = pool_totals(url, "decode", "external_hit_tokens_total") - hits_before
    moved = pool_totals(url, "decode", "kv_transfer_bytes_total") - bytes_before
    transfers = pool_totals(url, "decode", "kv_transfers_total") - transfers_before
    assert hits >= sum(n - 1 for n in prompt_tokens), (hits, prompt_tokens)
    assert transfers >= len(prompts)
    kv_bytes_per_token = 2 * 2 * 64 * 2 * 2  # layers x kv heads x head_dim x (K,V) x bf16
    assert moved >= sum((n - 1) // 32 * 32 for n in prompt_tokens) * kv_bytes_per_token
    if transport == "grpc" and expected_kv_mode() == "same-host":
        same_host = pool_totals(url, "decode", "kv_same_host_transfers_total") - same_host_before
        assert same_host >= sum(1 for n in moved_by_pull if n), (same_host, moved_by_pull)


def test_streamed_pd_equals_non_streamed(clusters):
    body = chat_body(_prompt(99, 40), max_tokens=12)
    r, chunks = stream_chat(clusters.pd_url, body)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    assert chunks[-1] == {"done": True}
    streamed = [t for c in chunks[:-1] for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    assert streamed == _token_ids(post(clusters.mono_url, "/v1/chat/completions", body))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_completions_endpoint_pd_equals_monolithic(clusters):
    body = {"model": "tiny", "prompt": _prompt(7, 90), "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    a = post(clusters.pd_url, "/v1/completions", body)
    b = post(clusters.mono_url, "/v1/completions", body)
    assert a.headers["x-pdserve-path"] == "pd"
    assert a.json()["choices"][0]["token_ids"] == b.json()["choices"][0]["token_ids"]


def test_concurrent_requests_all_served_by_pd(clusters):
    bodies = [chat_body(_prompt(200 + i, 10 + 7 * i), max_tokens=8) for i in range(12)]
    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda b: post(clusters.pd_url, "/v1/chat/completions", b), bodies))
    assert [r.status_code for r in rs] == [200] * len(bodies)
    assert {r.headers["x-pdserve-path"] for r in rs} == {"pd"}


def _allowed_cores(tid: int) -> set[int]:
    try:
        return set(os.sched_getaffinity(tid))
    except ProcessLookupError:  # the thread ended between listing and reading
        return set()


def test_prefill_and_decode_run_on_disjoint_cores(clusters):
    import psutil

    pools = status(clusters.pd_url)["pools"]
    owned = {}
    for pool in ("prefill", "decode"):
        (rep,) = pools[pool]
        # The engine processes (vLLM's engine core and its workers) own the cores; the
        # replica's own process only templates and frames, and floats like an API server.
        replica = psutil.Process(rep["pid"])
        engine_procs = replica.children(recursive=True)
        # The engine core: the replica's one child that is not multiprocessing's resource
        # tracker. Not found by process title: vLLM's children do not always carry theirs.
        direct = [p for p in replica.children() if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(direct) == 1, [(p.pid, p.cmdline()) for p in replica.children()]
        engine_core = direct[0]
        cores, seen = set(), []
        for p in engine_procs:
            try:
                for t in p.threads():
                    mask = _allowed_cores(t.id)
                    cores |= mask
                    seen.append((p.pid, p.name(), t.id, sorted(mask)))
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue  # a short-lived helper exited between listing and reading
        assert cores == set(rep["cores"]), (pool, cores, rep["cores"], seen)
        owned[pool] = cores
        # vLLM's OpenMP threads are bound to the replica's cores, not 'auto'.
        assert engine_core.environ().get("VLLM_CPU_OMP_THREADS_BIND") == ",".join(map(str, rep["cores"]))
    assert owned["prefill"].isdisjoint(owned["decode"])


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_idle_engines_do_not_spin(clusters, transport):
    """An idle P/D engine leaves its core to the other work on it. NIXL's agent used to spin
    its progress thread (poll with a zero timeout): about 90 % of a core per idle engine."""
    import time

    import psutil

    url = clusters.pd_url if transport == "nixl" else clusters.grpc_url
    pools = status(url)["pools"]
    procs = [c for pool in ("prefill", "decode") for rep in pools[pool]
             for c in psutil.Process(rep["pid"]).children(recursive=True)]

    def cpu_seconds() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    time.sleep(1.0)  # let the last request's work settle
    before, t0 = cpu_seconds(), time.monotonic()
    time.sleep(4.0)
    share = (cpu_seconds() - before) / (time.monotonic() - t0)
    assert share < 0.25, f"idle {transport} P/D engines used {share:.0%} of a core"


def test_status_cli(clusters, capsys):
    from pdserve.cluster.cli import main

    assert main(["status", "--url", clusters.pd_url]) == 0
    out = capsys.readouterr().out
    assert "pool prefill: 1 replica(s)" in out and "pool decode: 1 replica(s)" in out
