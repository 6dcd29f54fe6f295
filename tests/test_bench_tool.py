"""``pdserve bench`` / ``pdserve ab`` without clusters: metric maths by hand, arrivals, workloads,
a run against an in-process STUB OpenAI SSE server, the report writer and the budget check."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import ab, bench_cli
from pdserve.bench.loadgen import LoadSpec, arrival_offsets, interarrival_times, run_benchmark
from pdserve.bench.ports import free_port
from pdserve.bench.report import find_knee, write_report
from pdserve.bench.stats import RequestOutput, compute_metrics, meets_slos, parse_goodput
from pdserve.bench.workloads import VOCAB, SampleRequest, Tenant, WorkloadSpec, generate
from pdserve.cluster.cli import main as pdserve_main
from pdserve.settings.cluster import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ---------------------------------------------------------------------------------------------
# metric maths, checked against numbers worked out by hand


def _req(ttft: float, tpot: float, path: str, out: int = 11) -> RequestOutput:
    # ITLs all equal to the TPOT; e2e = ttft + (out - 1) * tpot
    return RequestOutput(success=True, status=200, ttft=ttft, itl=[tpot] * (out - 1), latency=ttft + (out - 1) * tpot,
                         output_tokens=out, prompt_len=100, path=path)


def _sample() -> list[RequestOutput]:
    return [
        _req(0.3, 0.02, "fallback"),  # C: TTFT 300 ms (exactly on a 300 ms SLO), TPOT 20 ms, E2E 500 ms
        _req(0.1, 0.05, "pd"),        # A: TPOT 50 ms misses tpot:35 only; E2E 600 ms
        _req(0.5, 0.03, "monolithic"),  # E: TTFT 500 ms misses ttft:350 only; E2E 800 ms
        _req(0.2, 0.01, "pd"),        # B: meets everything; E2E 300 ms
        _req(0.4, 0.04, "pd"),        # D: misses both ttft:350 and tpot:35; E2E 800 ms
        RequestOutput(success=False, status=503, prompt_len=100, error="HTTP 503: overloaded"),
    ]


def test_percentiles_mean_std_by_hand():
    m = compute_metrics(_sample(), duration=2.0, percentiles=[50, 90, 99])
    # TTFT sorted 100,200,300,400,500 ms. Linear: p90 at rank 0.9*4 = 3.6 -> 400 + 0.6*100
    assert m["mean_ttft_ms"] == pytest.approx(300.0)
    assert m["median_ttft_ms"] == pytest.approx(300.0)
    assert m["p50_ttft_ms"] == pytest.approx(300.0)
    assert m["p90_ttft_ms"] == pytest.approx(460.0)
    assert m["p99_ttft_ms"] == pytest.approx(496.0)  # rank 3.96
    # population std: sqrt((200^2 + 100^2 + 0 + 100^2 + 200^2) / 5) = sqrt(20000)
    assert m["std_ttft_ms"] == pytest.approx(141.4213562)
    # TPOT 10..50 ms
    assert m["p50_tpot_ms"] == pytest.approx(30.0)
    assert m["p90_tpot_ms"] == pytest.approx(46.0)
    assert m["p99_tpot_ms"] == pytest.approx(49.6)
    # E2E sorted 300,500,600,800,800: p90 rank 3.6 -> 800
    assert m["mean_e2el_ms"] == pytest.approx(600.0)
    assert m["median_e2el_ms"] == pytest.approx(600.0)
    assert m["p90_e2el_ms"] == pytest.approx(800.0)
    # ITL: ten each of 10,20,30,40,50 ms
    assert m["mean_itl_ms"] == pytest.approx(30.0)
    assert m["p90_itl_ms"] == pytest.approx(50.0)
    # the 503 counts as failed, with output length 0
    assert (m["completed"], m["failed"]) == (5, 1)
    assert m["output_lens"] == [11, 11, 11, 11, 11, 0]
    assert m["total_output_tokens"] == 55
    assert m["total_input_tokens"] == 500  # successful requests only, as vLLM
    assert m["request_throughput"] == pytest.approx(2.5)
    assert m["output_throughput"] == pytest.approx(27.5)
    assert m["total_token_throughput"] == pytest.approx(277.5)
    assert m["request_goodput"] is None  # no SLOs given
    assert m["status_counts"] == {"200": 5, "503": 1}
    assert m["paths"] == {"fallback": 1, "monolithic": 1, "pd": 3}
    assert m["fallback_fraction"] == pytest.approx(0.2)
    assert m["error_samples"] == ["HTTP 503: overloaded"]


def test_percentiles_match_numpy_on_random_samples():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(0.2, n)
        outs = [RequestOutput(success=True, ttft=float(x), latency=float(x) + 1, output_tokens=1) for x in xs]
        m = compute_metrics(outs, 1.0, percentiles=[1, 37.5, 99.9])
        for p, key in ((1, "p1"), (37.5, "p37.5"), (99.9, "p99.9")):
            assert m[f"{key}_ttft_ms"] == pytest.approx(np.percentile(xs * 1000, p))


def test_goodput_counts_requests_meeting_all_slos():
    outs = _sample()
    # A misses tpot only, E misses ttft only, D misses both: B and C are good.
    m = compute_metrics(outs, 2.0, slos_ms=parse_goodput(["ttft:350", "tpot:35"]))
    assert m["good_requests"] == 2
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["slo_attainment"] == pytest.approx(2 / 6)
    assert m["goodput_slos_ms"] == {"ttft": 350.0, "tpot": 35.0}
    # TTFT only: A, B, C
    assert compute_metrics(outs, 2.0, slos_ms={"ttft": 350})["good_requests"] == 3
    # a value equal to the SLO meets it (C's TTFT is exactly 300 ms)
    assert compute_metrics(outs, 2.0, slos_ms={"ttft": 300})["good_requests"] == 3
    # e2el:550 keeps B (300) and C (500)
    assert compute_metrics(outs, 2.0, slos_ms={"e2el": 550})["good_requests"] == 2
    # a failed request is never good, a single-token output meets any TPOT SLO (vLLM: tpot 0)
    assert not meets_slos(outs[-1], {})
    one = RequestOutput(success=True, ttft=0.1, latency=0.1, output_tokens=1)
    assert one.tpot == 0.0 and meets_slos(one, {"tpot": 1})


def test_parse_goodput_rejects_bad_pairs():
    assert parse_goodput(["e2el:1000"]) == {"e2el": 1000.0}
    for bad in ("ttft", "latency:5", "ttft:abc", "ttft:-1"):
        with pytest.raises(ValueError):
            parse_goodput([bad])


def test_json_field_names_follow_vllm():
    m = compute_metrics(_sample(), 2.0, percentiles=[50, 90, 95, 99], slos_ms={"ttft": 500})
    vllm_names = {
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "request_goodput", "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts",
        "itls", "latencies", "start_times", "errors", "max_output_tokens_per_s", "max_concurrent_requests",
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        vllm_names |= {f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"}
        vllm_names |= {f"p{p}_{metric}_ms" for p in (50, 90, 95, 99)}
    assert vllm_names <= m.keys()
    assert {"fallback_fraction", "paths", "status_counts"} <= m.keys()
    json.dumps(m, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# arrivals


def test_poisson_interarrival_mean_and_burstiness():
    rng = np.random.default_rng(1234)
    rate = 4.0
    gaps = interarrival_times(50_000, rate, 1.0, rng)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # exponential: coefficient of variation 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    # gamma shape k has CV 1/sqrt(k): burstier below 1, steadier above, same mean
    bursty = interarrival_times(50_000, rate, 0.25, np.random.default_rng(5))
    steady = interarrival_times(50_000, rate, 4.0, np.random.default_rng(6))
    assert bursty.mean() == pytest.approx(1 / rate, rel=0.05)
    assert steady.mean() == pytest.approx(1 / rate, rel=0.03)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert steady.std() / steady.mean() == pytest.approx(0.5, rel=0.1)
    assert bursty.var() > gaps.var() > steady.var()


def test_arrival_offsets_are_seeded_increasing_and_end_at_n_over_rate():
    a = arrival_offsets(200, 8.0, 1.0, seed=7)
    assert a == arrival_offsets(200, 8.0, 1.0, seed=7)
    assert a != arrival_offsets(200, 8.0, 1.0, seed=8)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert a[-1] == pytest.approx(200 / 8.0)  # vLLM's rescaling
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5


# ---------------------------------------------------------------------------------------------
# workloads


def test_chat_workload_lognormal_lengths_within_bounds():
    spec = WorkloadSpec(kind="chat", num_prompts=2000, seed=1, input_len_mean=200, input_len_sigma=0.8,
                        input_len_min=20, input_len_max=600, output_len_mean=50, output_len_sigma=0.6,
                        output_len_min=5, output_len_max=100)
    reqs = generate(spec)
    ins, outs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    assert 20 <= min(ins) and max(ins) <= 600 and 5 <= min(outs) and max(outs) <= 100
    assert min(ins) == 20 and max(ins) == 600  # sigma 0.8 reaches both clips
    assert 150 < np.mean(ins) < 230  # clipping pulls the mean of 200 down a little
    assert len(set(ins)) > 100
    assert all(len(r.prompt.split()) == r.prompt_len for r in reqs[:50])
    assert set(reqs[0].prompt.split()) <= set(VOCAB)
    assert generate(spec) == reqs  # seeded


def test_fixed_and_shared_prefix_workloads():
    fixed = generate(WorkloadSpec(kind="fixed", num_prompts=10, input_len=33, output_len=7))
    assert {(len(r.prompt.split()), r.output_len) for r in fixed} == {(33, 7)}
    spec = WorkloadSpec(kind="shared-prefix", num_prompts=60, prefix_len=40, num_prefixes=3, suffix_len=10,
                        output_len=5, seed=2)
    reqs = generate(spec)
    groups: dict[int, list[SampleRequest]] = {}
    for r in reqs:
        groups.setdefault(r.prefix_id, []).append(r)
    assert set(groups) == {0, 1, 2}
    prefixes = set()
    for rs in groups.values():
        prefix = rs[0].prompt.split()[:40]
        prefixes.add(tuple(prefix))
        assert all(r.prompt.split()[:40] == prefix for r in rs)
        assert len({r.prompt for r in rs}) == len(rs)  # suffixes differ
    assert len(prefixes) == 3
    assert all(len(r.prompt.split()) == 50 and r.prompt_len == 50 and r.output_len == 5 for r in reqs)


def test_tenant_mix_follows_weights():
    tenants = (Tenant("gold", "k-gold", 3), Tenant("silver", "k-silver", 1), Tenant("free", "k:free", 1))
    reqs = generate(WorkloadSpec(kind="tenants", num_prompts=5000, tenants=tenants, seed=4))
    frac = {k: v / 5000 for k, v in Counter(r.tenant for r in reqs).items()}
    assert frac["gold"] == pytest.approx(0.6, abs=0.03)
    assert frac["silver"] == pytest.approx(0.2, abs=0.03)
    assert frac["free"] == pytest.approx(0.2, abs=0.03)
    assert all(r.api_key == {"gold": "k-gold", "silver": "k-silver", "free": "k:free"}[r.tenant] for r in reqs)


def test_tenant_flag_parsing():
    assert bench_cli._tenant("a:sk:with:colons:2.5") == Tenant("a", "sk:with:colons", 2.5)
    for bad in ("a:k", "a::1", "a:k:0", "a:k:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_cli._tenant(bad)


# ---------------------------------------------------------------------------------------------
# a functional run against a STUB OpenAI SSE server (aiohttp, loopback, free port)


STUB_LIMITED_KEY = "stub-key-limited"


class StubOpenAIServer:
    """A STUB, not vLLM: streams max_tokens one-word chunks with a short sleep, labels every
    3rd request x-pdserve-path: fallback (the rest pd), answers 429 for STUB_LIMITED_KEY."""

    def __init__(self, usage: bool = True, chunk_sleep_s: float = 0.002) -> None:
        self.usage = usage
        self.chunk_sleep_s = chunk_sleep_s
        self.count = 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    async def _complete(self, request):
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        key = request.headers.get("Authorization")
        self.auth.append(key)
        if key == f"Bearer {STUB_LIMITED_KEY}":
            return web.json_response({"error": {"message": "rate limited", "code": 429}}, status=429)
        self.count += 1
        path = "fallback" if self.count % 3 == 0 else "pd"
        headers = {"Content-Type": "text/event-stream", "x-pdserve-path": path}
        if path == "fallback":
            headers["x-pdserve-fallback-cause"] = "stub_link_down"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]

        async def send(obj) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        def choice(text, finish=None):
            if chat:
                return {"index": 0, "delta": {"content": text} if text is not None else {"role": "assistant"},
                        "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        if chat:
            await send({"choices": [choice(None)]})  # role-only opening chunk: not a token
        n = body["max_tokens"]
        for _ in range(n):
            await asyncio.sleep(self.chunk_sleep_s)
            await send({"choices": [choice(" tok")]})
        await send({"choices": [choice("" if not chat else None, "length")]})
        if self.usage and body.get("stream_options", {}).get("include_usage"):
            pt = len(prompt.split())
            await send({"choices": [], "usage": {"prompt_tokens": pt, "completion_tokens": n,
                                                 "total_tokens": pt + n}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _serve(self) -> None:
        from aiohttp import web

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
            app.router.add_post("/v1/chat/completions", self._complete)
            app.router.add_post("/v1/completions", self._complete)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __enter__(self) -> "StubOpenAIServer":
        self._thread.start()
        assert self._ready.wait(10), "stub server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_bench_engine_against_stub_server():
    tenants = (Tenant("paid", "stub-key-paid", 3), Tenant("limited", STUB_LIMITED_KEY, 1))
    reqs = generate(WorkloadSpec(kind="tenants", num_prompts=40, seed=3, input_len_mean=30, input_len_min=5,
                                 input_len_max=60, output_len_mean=6, output_len_min=2, output_len_max=10,
                                 tenants=tenants))
    by_tenant = Counter(r.tenant for r in reqs)
    limited = by_tenant["limited"]
    assert 0 < limited < 40
    with StubOpenAIServer() as stub:
        res = run_benchmark(stub.url, "chat", "stub-model", reqs, LoadSpec(request_rate=200.0, max_concurrency=8),
                            seed=1, percentiles=[50, 99], slos_ms={"ttft": 5000}, progress=False)
        bodies, auth = stub.bodies, stub.auth
    ok = [r for r in reqs if r.tenant == "paid"]
    assert res["completed"] == len(ok) and res["failed"] == limited
    assert res["status_counts"] == {"200": len(ok), "429": limited}
    # every 3rd served request was labelled fallback by the stub
    assert res["paths"] == {"fallback": len(ok) // 3, "pd": len(ok) - len(ok) // 3}
    assert res["fallback_fraction"] == pytest.approx((len(ok) // 3) / len(ok))
    assert res["total_output_tokens"] == sum(r.output_len for r in ok)
    assert res["total_input_tokens"] == sum(len(r.prompt.split()) for r in ok)  # usage.prompt_tokens
    assert res["good_requests"] == len(ok)
    assert res["max_concurrency"] == 8 and res["request_rate"] == 200.0
    # as in vLLM: one ITL per chunk with choices after the first (role and finish chunks included)
    assert all(len(i) >= n - 1 for i, n, e in zip(res["itls"], res["output_lens"], res["errors"]) if not e)
    assert res["p50_ttft_ms"] > 0 and res["p50_tpot_ms"] > 0
    pt = res["per_tenant"]
    assert pt["limited"]["status_counts"] == {"429": limited} and pt["limited"]["completed"] == 0
    assert pt["paid"]["status_counts"] == {"200": len(ok)} and pt["paid"]["completed"] == len(ok)
    assert any("429" in e for e in res["error_samples"])
    # what went over the wire
    b = bodies[0]
    assert b["ignore_eos"] is True and b["temperature"] == 0 and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True}
    assert {a for a in auth} == {"Bearer stub-key-paid", f"Bearer {STUB_LIMITED_KEY}"}
    json.dumps(res, allow_nan=False)


def test_bench_counts_content_chunks_without_usage_and_completions_endpoint():
    reqs = generate(WorkloadSpec(kind="fixed", num_prompts=6, input_len=12, output_len=5))
    with StubOpenAIServer(usage=False) as stub:
        res = run_benchmark(stub.url, "completions", "stub-model", reqs, LoadSpec(), progress=False)
    assert res["completed"] == 6 and res["output_lens"] == [5] * 6
    assert res["input_lens"] == [12] * 6  # no usage: the target length stands
    assert res["backend"] == "openai" and res["request_rate"] == "inf"


def test_bench_cli_sweep_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    with StubOpenAIServer() as stub:
        rc = pdserve_main(["bench", "--url", stub.url, "--workload", "fixed", "--input-len", "8", "--output-len", "3",
                           "--num-prompts", "5", "--rates", "50,inf", "--goodput", "ttft:2000", "tpot:500",
                           "--percentiles", "50,95", "--disable-tqdm", "--result-file", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["model_id"] == "stub-model"  # from GET /v1/models
    assert [r["request_rate"] for r in data["runs"]] == [50.0, "inf"]
    assert all(r["completed"] == 5 and r["good_requests"] == 5 for r in data["runs"])
    assert "p95_ttft_ms" in data["runs"][0] and "p99_ttft_ms" not in data["runs"][0]


def test_bench_cli_unreachable_url_exits_1(capsys):
    rc = pdserve_main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1", "--disable-tqdm"])
    assert rc == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "request rate must be > 0"),
    (["--rates", "1,x"], "is not a request rate"),
    (["--burstiness", "-1"], "must be > 0"),
    (["--goodput", "ttft=5"], "NAME:MILLISECONDS"),
    (["--tenant", "a:b"], "NAME:API_KEY:WEIGHT"),
    (["--percentiles", "50,101"], "[0, 100]"),
    (["--workload", "nope"], "invalid choice"),
])
def test_bench_cli_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pdserve_main(["bench", "--url", "http://127.0.0.1:9", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "1", "--rates", "1,2"], "not both"),
    (["--workload", "tenants"], "needs at least one --tenant"),
    (["--input-len-min", "50", "--input-len-max", "10"], "--input-len-min exceeds"),
])
def test_bench_cli_inconsistent_arguments_exit_2(argv, message, capsys):
    assert pdserve_main(["bench", "--url", "http://127.0.0.1:9", *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# knee and report


def _run(rate, goodput, attainment, ttft_p50=50.0, n=20, seed=0, fallback=None):
    rng = random.Random(seed)
    offered = math.inf if rate == "inf" else rate
    ttfts = [rng.uniform(0.02, 0.2) for _ in range(n)]
    lat = [t + 9 * rng.uniform(0.005, 0.03) for t in ttfts]
    return {"request_rate": rate, "request_goodput": goodput, "slo_attainment": attainment, "burstiness": 1.0,
            "max_concurrency": None, "completed": n, "num_prompts": n, "request_throughput": offered * 0.95,
            "output_throughput": offered * 9.5, "p50_ttft_ms": ttft_p50, "p95_ttft_ms": ttft_p50 * 2,
            "p50_tpot_ms": 12.0, "p95_tpot_ms": 20.0, "fallback_fraction": fallback, "ttfts": ttfts,
            "latencies": lat, "output_lens": [10] * n, "errors": [""] * n}


def test_find_knee_on_synthetic_curves():
    rising_then_saturating = [_run(1, 0.97, 1.0), _run(2, 1.95, 0.99), _run(4, 3.7, 0.93), _run(8, 4.1, 0.5)]
    k = find_knee(rising_then_saturating)
    assert k.rate == 4 and not k.top_of_sweep and k.max_goodput == 4.1 and k.max_goodput_rate == 8
    # all sustained: knee is the top rate, flagged as a lower bound
    k = find_knee([_run(1, 0.99, 1.0), _run(2, 1.98, 0.99)])
    assert k.rate == 2 and k.top_of_sweep and k.describe().startswith("≥")
    # misses the SLOs already at the lowest rate
    assert find_knee([_run(1, 0.5, 0.5), _run(2, 0.4, 0.2)]).rate is None
    # attainment fine but goodput fell: stops there
    assert find_knee([_run(1, 0.99, 0.99), _run(2, 1.9, 0.95), _run(3, 1.8, 0.92)]).rate == 2
    # a threshold of 0.95 moves the knee down; inf rates and order do not matter
    assert find_knee([_run(4, 3.7, 0.93), _run("inf", 9, 0.1), _run(1, 0.97, 1.0), _run(2, 1.95, 0.99)],
                     threshold=0.95).rate == 2


def test_write_report_from_two_synthetic_arms(tmp_path):
    pd = {"workload": "chat: synthetic", "endpoint": "chat", "model_id": "tiny", "goodput_slos_ms": {"ttft": 500},
          "arm": {"source": "synthetic P/D", "config_summary": "mode pd", "budget": "2 CPU cores",
                  "config_path": "configs/cpu-pd.yaml", "config_text": "mode: pd\n"},
          "runs": [_run(1, 0.98, 1.0, 40, seed=1, fallback=0.0), _run(2, 1.96, 0.98, 45, seed=2, fallback=0.05),
                   _run(4, 3.8, 0.95, 60, seed=3, fallback=0.1), _run(8, 5.0, 0.6, 300, seed=4, fallback=0.2)]}
    mono = {"workload": "chat: synthetic", "runs": [_run(1, 0.98, 1.0, 30, seed=5), _run(2, 1.9, 0.96, 50, seed=6),
                                                    _run(4, 2.5, 0.6, 400, seed=7), _run(8, 2.0, 0.2, 900, seed=8)]}
    hw = {"cpu_model": "Stub CPU 9000", "logical_cores": 2, "usable_cores": 2, "gpus": [], "platform": "test"}
    summary = write_report(pd, mono, tmp_path / "rep", hardware=hw)
    text = summary.read_text()
    assert "Stub CPU 9000, 2 logical cores" in text and "GPU: none" in text
    assert "- P/D: 4 req/s" in text and "- monolithic: 2 req/s" in text
    assert "**Verdict:** P/D wins" in text and "2.00x" in text
    assert text.count("| 4 | ") == 2 and "| 8 | P/D | 20/20 |" in text
    assert "2 CPU cores" in text and "10.0%" in text and "TTFT ≤ 500 ms" in text
    assert "```yaml\nmode: pd\n```" in text
    for png in ("latency_cdf.png", "goodput_vs_rate.png", "ttft_vs_rate.png", "tpot_vs_rate.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((tmp_path / "rep" / "pd.json").read_text())
    assert saved["goodput_knee"] == {"rate": 4, "top_of_sweep": False, "threshold": 0.9}
    assert json.loads((tmp_path / "rep" / "monolithic.json").read_text())["goodput_knee"]["rate"] == 2


# ---------------------------------------------------------------------------------------------
# pdserve ab: the hardware budget check (no cluster is ever started here)


def test_shipped_cpu_configs_share_a_two_core_budget():
    pd, mono = load_config(CONFIGS / "cpu-pd.yaml"), load_config(CONFIGS / "cpu-monolithic.yaml")
    assert ab.hardware_budget(pd) == ("cpu", 2.0)
    assert ab.hardware_budget(mono) == ("cpu", 2.0)
    assert ab.check_same_budget(pd, mono) == "2 CPU cores"


def _write_mono(tmp_path: Path, cores: list[str]) -> Path:
    text = (CONFIGS / "cpu-monolithic.yaml").read_text()
    text = text.replace('replicas: 2\n  cpu_cores: ["0", "1"]', f"replicas: {len(cores)}\n  cpu_cores: {json.dumps(cores)}")
    p = tmp_path / "mono.yaml"
    p.write_text(text)
    assert load_config(p).monolithic.cpu_cores == cores
    return p


def test_ab_refuses_configs_with_different_core_budgets(tmp_path, capsys, monkeypatch):
    def no_cluster(*a, **k):
        raise AssertionError("pdserve ab must not start a cluster when it refuses")

    monkeypatch.setattr(ab, "run_arm", no_cluster)
    wide = _write_mono(tmp_path, ["0-1", "2-3"])
    with pytest.raises(ab.BudgetMismatch, match="P/D uses 2 CPU cores .* monolithic uses 4 CPU cores"):
        ab.check_same_budget(load_config(CONFIGS / "cpu-pd.yaml"), load_config(wide))
    rc = pdserve_main(["ab", "--pd-config", str(CONFIGS / "cpu-pd.yaml"), "--mono-config", str(wide),
                       "--rates", "1,2,4", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refusing to compare" in err and "4 CPU cores" in err
    assert not (tmp_path / "out").exists()


def test_ab_refuses_cpu_against_gpu_and_swapped_modes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ab, "run_arm", lambda *a, **k: pytest.fail("no cluster may start"))
    with pytest.raises(ab.BudgetMismatch, match="same kind of device"):
        ab.check_same_budget(load_config(CONFIGS / "gpu-pd.yaml"), load_config(CONFIGS / "cpu-monolithic.yaml"))
    assert ab.hardware_budget(load_config(CONFIGS / "gpu-pd.yaml")) == ("gpu", 4.0)
    rc = pdserve_main(["ab", "--pd-config", str(CONFIGS / "cpu-monolithic.yaml"), "--mono-config",
                       str(CONFIGS / "cpu-monolithic.yaml"), "--rates", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "not 'pd'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        pdserve_main(["ab", "--pd-config", "x.yaml", "--mono-config", "y.yaml", "--out", str(tmp_path)])
    assert e.value.code == 2  # --rates is required


def test_ab_against_two_stub_urls_writes_report(tmp_path):
    with StubOpenAIServer() as a, StubOpenAIServer(chunk_sleep_s=0.004) as b:
        rc = pdserve_main(["ab", "--pd-url", a.url, "--mono-url", b.url, "--rates", "20,40", "--workload", "fixed",
                           "--input-len", "8", "--output-len", "3", "--num-prompts", "6", "--num-warmups", "1",
                           "--goodput", "ttft:3000", "--disable-tqdm", "--out", str(tmp_path / "ab")])
    assert rc == 0
    text = (tmp_path / "ab" / "summary.md").read_text()
    assert "**Verdict:**" in text and "| 20 | P/D |" in text and "| 40 | monolithic |" in text
    assert (tmp_path / "ab" / "goodput_vs_rate.png").exists()
    pd = json.loads((tmp_path / "ab" / "pd.json").read_text())
    assert pd["arm"]["source"].startswith("running server at") and len(pd["runs"]) == 2
