"""pdserve answers as vLLM's own OpenAI server does, on every path (bench/fidelity.py).

vLLM's server (``python -m vllm.entrypoints.openai.api_server``) runs on core 0 with the engine
settings of the shared cluster's apps (bench/vllm_server.py) and answers the bounded set of
request shapes (bench/fidelity_shapes.py ``bounded()``: every option once and every bad input)
once; then each path of the session cluster answers them and must
give the same answers, with only ids, timestamps, the fingerprint, prefix-cache counts and a
stream's cut into chunks masked (bench/fidelity_compare.py), and must say it took that path
(``x-pdserve-path``, or the router's resume counter):

* P/D over NIXL and over the gRPC stream, and monolithic serving;
* fallback: the gRPC app with every KV link killed (healed after); an answer served P/D that
  pulled no KV (its decode engine cached the whole prompt, e.g. from a fallback served there)
  never used a link and is right as P/D, so long as most answers took fallback;
* mid-stream resume: the gRPC app, each greedy stream shape of the set cut after its first
  token (needs root and ``ss -K``; skipped where sockets cannot be destroyed).

The whole set, on every path, against any running cluster: ``python -m pdserve.bench.fidelity``
(docs/operations.md).
"""
from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.cluster


def _engine_settings(cfg) -> tuple:
    return cfg.model.model_dump(), cfg.engine.model_dump()


@pytest.fixture(scope="module")
def vllm_answers(clusters, tmp_path_factory):
    """vLLM's own server's answers to every shape, on core 0 (it is stopped afterwards)."""
    from pdserve.bench.fidelity import record
    from pdserve.bench.fidelity_shapes import bounded
    from pdserve.bench.vllm_server import VllmServer

    for cfg in (clusters.grpc_cfg, clusters.mono_cfg):
        assert _engine_settings(cfg) == _engine_settings(clusters.pd_cfg), "the apps' engines differ"
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    t0 = time.perf_counter()
    with VllmServer(clusters.pd_cfg, core=0, log_path=str(log)) as server:
        t1 = time.perf_counter()
        answers = record(server.url, bounded())
    print(f"\nvLLM's own server: ready in {t1 - t0:.1f} s, {len(answers)} answers in {time.perf_counter() - t1:.1f} s")
    return answers


def _run(kind: str, url: str, label: str, answers) -> None:
    from pdserve.bench.fidelity import DEV_ADMIN_KEY, Runner, summary
    from pdserve.bench.fidelity_shapes import bounded

    result = Runner(answers, bounded(), admin_key=DEV_ADMIN_KEY, log=print).run_path(kind, url, label)
    print("\n" + summary([result], bounded()))
    assert result.ran > 0
    assert not result.mismatches, "\n".join(f"{m.shape}: {m.lines}" for m in result.mismatches)
    # with every link killed, a P/D answer is right only where no KV had to move; most must
    assert len(result.no_transfer) < result.ran / 2, result.no_transfer


def test_pd_over_nixl_answers_as_vllm(clusters, vllm_answers):
    _run("pd", clusters.pd_url, "pd-nixl", vllm_answers)


def test_pd_over_grpc_answers_as_vllm(clusters, vllm_answers):
    _run("pd", clusters.grpc_url, "pd-grpc", vllm_answers)


def test_monolithic_answers_as_vllm(clusters, vllm_answers):
    _run("monolithic", clusters.mono_url, "monolithic", vllm_answers)


def test_fallback_answers_as_vllm(clusters, vllm_answers):
    _run("fallback", clusters.grpc_url, "fallback-grpc", vllm_answers)


def test_a_resumed_stream_answers_as_vllm(clusters, vllm_answers):
    if os.geteuid() != 0 or not _can_destroy_sockets():
        pytest.skip("the resume path cuts streams with ss -K (needs root and CONFIG_INET_DIAG_DESTROY)")
    _run("resume", clusters.grpc_url, "resume-grpc", vllm_answers)


def _can_destroy_sockets() -> bool:
    from test_fallback_causes_cluster import _can_destroy_sockets as can

    return can()
