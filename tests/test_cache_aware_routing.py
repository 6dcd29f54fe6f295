"""Cache-aware routing and the disaggregation modes, without engines: the config-chosen
selection pipelines (router/selection_config.py, router/selection.py), the prefix scorer
(router/scorers/prefix.py) over a prefix index fed by hand, and the router pipeline over
in-memory pools with router.disaggregation always / never / adaptive (router/disaggregate.py)."""
from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError
from router_fakes import FakeChecker, FakeRequest, MemoryCluster, MemoryEngine, run

from pdserve.router.prefix_index import PrefixIndex, PromptKeys
from pdserve.router.selection import FACTORIES, Candidate, SelectionDeps, SelectionRequest, build_pipeline
from pdserve.router.selection_config import (FilterSpec, PickerSpec, PoolSelectionSpec, ScorerSpec, SelectionSpec,
                                             default_selection)
from pdserve.settings.cluster import ClusterConfig

kv_events = pytest.importorskip("vllm.distributed.kv_events")

BS = 32
PROMPT = list(range(200, 200 + 100))  # three full blocks of 32, and 4 tokens more


def hold(index: PrefixIndex, replica: str, tokens=PROMPT, salt=None, seq=0) -> None:
    """What a replica's engine publishes after prefilling ``tokens``."""
    full = len(tokens) // BS
    extra = [(salt,)] + [None] * (full - 1) if salt else None
    index.apply(replica, seq, [kv_events.BlockStored(
        block_hashes=[hash((replica, i)) for i in range(full)], parent_block_hash=None,
        token_ids=tokens[:full * BS], block_size=BS, lora_id=None, medium="GPU", lora_name=None,
        extra_keys=extra)])


def names(spec_union) -> set[str]:
    """Every plugin name a config section's union allows."""
    inner = typing.get_args(spec_union)[0]
    members = typing.get_args(inner) or (inner,)  # a union of one is that one class
    return {typing.get_args(m.model_fields["name"].annotation)[0] for m in members}


# ---------------------------------------------------------------------------- config


def test_every_plugin_name_the_config_allows_has_a_factory():
    build_pipeline(default_selection("decode"), SelectionDeps())  # registers the plugin modules
    assert names(FilterSpec) | names(ScorerSpec) | names(PickerSpec) == set(FACTORIES)


def test_the_default_pipelines_are_the_least_loaded_ones():
    cfg = MemoryCluster("pd").cfg
    assert not cfg.router.needs_kv_events() and cfg.router.disaggregation == "always"
    for pool, filters, scorers in (("prefill", ["healthy"], ["queue"]),
                                   ("decode", ["healthy", "kv_headroom"], ["queue", "kv_usage"]),
                                   ("monolithic", ["healthy", "kv_headroom"], ["queue", "kv_usage"])):
        pipe = build_pipeline(cfg.router.selection.for_pool(pool), SelectionDeps(kv_headroom=0.9))
        assert [f.name for f in pipe.filters] == filters and [s.name for s, _ in pipe.scorers] == scorers
        assert [w for _, w in pipe.scorers] == [1.0] * len(scorers) and pipe.picker.name == "min_score"
    assert build_pipeline(default_selection("decode"), SelectionDeps(kv_headroom=0.9)).filters[1].max_usage == 0.9


def test_selection_reads_bare_names_weights_and_settings():
    spec = PoolSelectionSpec.model_validate({"filters": ["healthy", {"name": "kv_headroom", "max_usage": 0.8}],
                                             "scorers": [{"name": "prefix", "weight": 2}, "queue"],
                                             "picker": "min_score"})
    pipe = build_pipeline(spec, SelectionDeps(prefix_index=PrefixIndex()))
    assert pipe.filters[1].max_usage == 0.8
    assert [(s.name, w) for s, w in pipe.scorers] == [("prefix", 2.0), ("queue", 1.0)]


@pytest.mark.parametrize("section, says", [
    ({"scorers": [{"name": "random"}]}, "random"),
    ({"filters": ["kv_headroom"]}, "must keep the 'healthy' filter"),
    ({"scorers": ["queue", {"name": "queue", "weight": 2}]}, "named twice"),
    ({"scorers": [{"name": "queue", "weight": -1}]}, "greater than or equal to 0"),
    ({"scorers": [{"name": "queue", "bias": 1}]}, "Extra inputs"),
])
def test_bad_selection_sections_fail_when_the_config_loads(section, says):
    with pytest.raises(ValidationError, match=says):
        PoolSelectionSpec.model_validate(section)


def _config(mode: str, **router) -> dict:
    cfg = MemoryCluster(mode).cfg.model_dump()
    cfg["router"].update(router)
    return cfg


def test_the_prefix_scorer_or_adaptive_mode_turn_the_engines_kv_events_on():
    prefix = {"decode": {"scorers": ["prefix", "queue"]}}
    assert ClusterConfig.model_validate(_config("pd", selection=prefix)).router.needs_kv_events()
    assert ClusterConfig.model_validate(_config("pd", disaggregation="adaptive")).router.needs_kv_events()
    assert not ClusterConfig.model_validate(_config("pd", disaggregation="never")).router.needs_kv_events()
    with pytest.raises(ValidationError, match="needs mode 'pd'"):
        ClusterConfig.model_validate(_config("monolithic", disaggregation="adaptive"))
    raw = _config("pd", selection=prefix)
    raw["engine"]["enable_prefix_caching"] = False
    with pytest.raises(ValidationError, match="enable_prefix_caching"):
        ClusterConfig.model_validate(raw)
    raw = _config("pd")
    raw["engine"]["engine_kwargs"] = {"kv_events_config": {}}
    with pytest.raises(ValidationError, match="set by pdserve"):
        ClusterConfig.model_validate(raw)


# ---------------------------------------------------------------------------- the prefix scorer


def test_the_prefix_scorer_weighs_a_cache_hit_against_queued_requests():
    index = PrefixIndex()
    hold(index, "cached")
    spec = PoolSelectionSpec.model_validate({"scorers": [{"name": "prefix", "weight": 2}, "queue"]})
    pipe = build_pipeline(spec, SelectionDeps(prefix_index=index))
    request = SelectionRequest(PromptKeys(PROMPT), len(PROMPT))
    # 96 of 100 tokens cached: score 0.08 + queue, against 2.0 + queue for the replica without them
    cands = [Candidate("cached", "decode", running=1), Candidate("cold", "decode")]
    assert pipe.pick(cands, request).replica_id == "cached" and request.cached == {"cached": 96, "cold": 0}
    assert request.picked["cached"].running == 1
    cands = [Candidate("cached", "decode", running=3), Candidate("cold", "decode")]
    assert pipe.pick(cands, SelectionRequest(PromptKeys(PROMPT), len(PROMPT))).replica_id == "cold"
    # another tenant's prompt, or one the router did not tokenize, finds no cache anywhere
    other = SelectionRequest(PromptKeys(PROMPT, "tenant-b"), len(PROMPT))
    assert pipe.pick([Candidate("cached", "decode", running=1), Candidate("cold", "decode")],
                     other).replica_id == "cold"
    assert pipe.scorers[0][0](Candidate("cached", "decode"), SelectionRequest(None, 100)) == 1.0


# ---------------------------------------------------------------------------- through the pipeline


class IdsChecker(FakeChecker):
    """The fake checker, handing on a completions prompt's token ids as the real one does."""

    def check(self, endpoint, body):
        checked = super().check(endpoint, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            checked.prompt_token_ids, checked.prompt_tokens = list(prompt), len(prompt)
        return checked


def cluster(mode: str = "pd", **router) -> MemoryCluster:
    from pdserve.router.core import Router

    c = MemoryCluster(mode)
    c.cfg = ClusterConfig.model_validate(_config(mode, **router))
    if mode == "pd":
        for rid in ("p0", "p1"):
            c.add("prefill", MemoryEngine("prefill", rid))
        for rid in ("d0", "d1"):
            c.add("decode", MemoryEngine("decode", rid))
    else:
        for rid in ("m0", "m1"):
            c.add("monolithic", MemoryEngine("monolithic", rid))
    c.router = Router(c.cfg, c.pools, IdsChecker(), kv_bytes_per_token=1024)
    return c


BODY = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}


def test_pd_legs_go_to_the_replicas_holding_the_prompt():
    c = cluster(selection={"prefill": {"scorers": ["prefix", "queue"]}, "decode": {"scorers": ["prefix", "queue"]}})
    hold(c.router.prefix_index, "p1")
    hold(c.router.prefix_index, "d0")
    for _ in range(6):  # without the scorer these ties would go either way
        r = run(c.serve(BODY, endpoint="completions"))
        assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
        assert (r.headers["x-pdserve-prefill-replica"], r.headers["x-pdserve-decode-replica"]) == ("p1", "d0")
        assert r.headers["x-pdserve-decision"] == "always"
    m = c.router.metrics
    assert m.prefix_tokens.labels("prefill", "cached")._value.get() == 6 * 96
    assert m.disaggregation.labels("pd", "always")._value.get() == 6


def test_monolithic_mode_routes_to_the_cached_replica():
    c = cluster("monolithic", selection={"monolithic": {"scorers": [{"name": "prefix", "weight": 2}, "queue"]}})
    hold(c.router.prefix_index, "m1")
    for _ in range(6):
        r = run(c.serve(BODY, endpoint="completions"))
        assert r.headers["x-pdserve-path"] == "monolithic" and r.headers["x-pdserve-engine-replica"] == "m1"


def test_never_serves_every_request_whole_on_a_decode_engine():
    c = cluster(disaggregation="never")
    r = run(c.serve(BODY, endpoint="completions"))
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "decode_local"
    assert r.headers["x-pdserve-decision"] == "never"
    assert not c.engines["p0"].calls and not c.engines["p1"].calls
    (_, body), = [call for rid in ("d0", "d1") for call in c.engines[rid].calls]
    assert "kv_transfer_params" not in body
    assert c.router.metrics.disaggregation.labels("decode_local", "never")._value.get() == 1


def warm(c: MemoryCluster, prefill_s_per_token: float, step_s: float) -> None:
    """Measurements as if the cluster had served a few P/D requests already."""
    m = c.router.disaggregator.measure
    for n in (100, 400, 1600):
        m.prefill_done("pd", n, 0.002 + prefill_s_per_token * n)
        m.transfers(1, n * 1024, 0.001 + n * 1024 * 1e-9)
        m.decoded(step_s, running=0, output_tokens=4)


def test_adaptive_keeps_pd_until_it_has_measured_then_serves_a_cheap_request_locally():
    c = cluster(disaggregation="adaptive", selection={"decode": {"scorers": ["prefix", "queue"]}})
    r = run(c.serve(BODY, endpoint="completions"))
    assert (r.headers["x-pdserve-path"], r.headers["x-pdserve-decision"]) == ("pd", "warmup")
    warm(c, prefill_s_per_token=1e-5, step_s=0.005)
    r = run(c.serve(BODY, endpoint="completions"))
    assert (r.headers["x-pdserve-path"], r.headers["x-pdserve-decision"]) == ("decode_local", "cheapest")
    d = r.headers["x-pdserve-decode-replica"]
    (_, body), = c.engines[d].calls[-1:]
    assert "kv_transfer_params" not in body  # whole on the decode engine, no prefill leg
    assert len(c.engines["p0"].calls) + len(c.engines["p1"].calls) == 1  # the warmup request's only
    m = c.router.metrics
    assert m.disaggregation.labels("pd", "warmup")._value.get() == 1
    assert m.disaggregation.labels("decode_local", "cheapest")._value.get() == 1
    # the decider's inputs reach /metrics at the next load poll
    c.router.poller.follow_kv_events()
    assert m.decider_input.labels("ready")._value.get() == 1.0


def test_adaptive_splits_a_request_whose_local_prefill_would_miss_ttft():
    c = cluster(disaggregation="adaptive")
    warm(c, prefill_s_per_token=1e-5, step_s=0.005)
    c.router.disaggregator.measure.prefill["decode"].add(100, 10.0)  # decode engines prefill very slowly
    for rid in ("p0", "p1"):  # no prefill engine has room for a whole request: its KV cache is full
        c.state(rid).load["kv_cache_usage"] = 0.99
    r = run(c.serve(BODY, endpoint="completions"))
    assert (r.headers["x-pdserve-path"], r.headers["x-pdserve-decision"]) == ("pd", "decode_local_ttft")


def test_adaptive_serves_whole_on_a_prefill_engine_less_loaded_than_the_decode_engines():
    c = cluster(disaggregation="adaptive")
    warm(c, prefill_s_per_token=1e-5, step_s=0.005)
    c.router.disaggregator.measure.decoded(0.040, running=40, output_tokens=4)  # steps grow with decodes
    for rid in ("d0", "d1"):
        c.state(rid).load["running"] = 30  # 32 ms steps: within the 50 ms TPOT SLO, less slack than idle
    r = run(c.serve(BODY, endpoint="completions"))
    assert (r.headers["x-pdserve-path"], r.headers["x-pdserve-decision"]) == ("prefill_whole", "least_loaded")
    p = r.headers["x-pdserve-engine-replica"]
    assert p in ("p0", "p1")
    (_, body), = c.engines[p].calls[-1:]
    assert "kv_transfer_params" not in body  # whole on the prefill engine: no KV to hand off
    assert not c.engines["d0"].calls and not c.engines["d1"].calls
    for rid in ("d0", "d1"):
        c.state(rid).load["running"] = 40  # 41 ms steps: past 80 % of the TPOT SLO
    r = run(c.serve(BODY, endpoint="completions"))
    assert (r.headers["x-pdserve-path"], r.headers["x-pdserve-decision"]) == ("prefill_whole", "decode_local_tpot")


def test_served_requests_feed_the_measurements_the_decider_reads():
    c = cluster(disaggregation="adaptive")
    m = c.router.disaggregator.measure
    r = run(c.serve(BODY, endpoint="completions"))  # warmup: P/D
    assert r.headers["x-pdserve-path"] == "pd"
    assert m.prefill["pd"].samples == 1 and m.decode_step.samples == 1 and m.output_tokens.value == 4
    assert m.prefill["decode"].samples == 0 and m.prefill["prefill"].samples == 0
    c = cluster(disaggregation="never")
    m = c.router.disaggregator.measure
    run(c.serve(BODY, endpoint="completions"))  # whole on a decode engine: its TTFT is its prefill
    assert m.prefill["decode"].samples == 1 and m.prefill["prefill"].samples == 0 and m.prefill["pd"].samples == 0


def test_prefills_sent_since_a_replicas_last_load_report_count_as_tokens_ahead_there():
    """Load reports come every poll interval: the decider counts the uncached tokens of the
    prefills this router sent a replica and has not seen done as work ahead there, so a burst
    between two reports does not see the same queues and all go the same way; the replica's
    own waiting count adds only requests besides those."""
    from types import SimpleNamespace

    from pdserve.router.decider import predict

    c = cluster(disaggregation="adaptive")
    dis = c.router.disaggregator
    ctx = SimpleNamespace(selection=SelectionRequest(None, 100), checked=SimpleNamespace(prompt_tokens=100),
                          cls="standard", body={})
    burst = [dis.backlog.add("d0", 600) for _ in range(3)]  # three prefills sent since d0's report
    p = Candidate("p0", "prefill", running=3, waiting=0, inflight=3)
    d = Candidate("d0", "decode", running=3, waiting=4, inflight=6)  # 4 waiting: 3 of them this burst
    s = dis.situation(ctx, p, d)
    assert (s.decode_tokens_ahead, s.decode_waiting, s.decode_running) == (1800, 1, 6)
    assert (s.prefill_tokens_ahead, s.prefill_waiting) == (0, 0)
    # with equal reports, the engine that took the burst now looks slower to start the next request
    warm(c, prefill_s_per_token=1e-5, step_s=0.005)
    m = dis.measure.snapshot()
    assert predict(m, s)["decode_local"].ttft_s > predict(m, s)["prefill_whole"].ttft_s
    for pending in burst:
        dis.backlog.done(pending)
    dis.backlog.done(burst[0])  # twice: nothing more
    s = dis.situation(ctx, p, Candidate("d0", "decode", running=3, waiting=0, inflight=3))
    assert s.decode_tokens_ahead == 0
    assert predict(m, s)["decode_local"].ttft_s == pytest.approx(predict(m, s)["prefill_whole"].ttft_s)


def test_a_request_is_pending_on_its_engine_until_its_first_item_however_it_ends():
    """The backlog holds a whole request's prefill from the decider's choice to its first answer
    (past its stream's head), and a P/D prefill leg's until it returns; one that fails, or
    whose client goes, leaves none."""
    c = cluster(disaggregation="adaptive", selection={"decode": {"scorers": ["prefix", "queue"]}})
    warm(c, prefill_s_per_token=1e-5, step_s=0.005)
    backlog = c.router.disaggregator.backlog
    seen = []
    for rid in ("d0", "d1", "p0", "p1"):
        c.engines[rid].before = lambda engine, endpoint, body: seen.append(
            (engine.replica_id, backlog.tokens(engine.replica_id), backlog.requests(engine.replica_id)))
    async def first_chunk_only():
        response = await c.router.pipeline.serve("completions", FakeRequest(BODY))
        at_head = backlog.snapshot()  # the stream's head: the engine accepted it, prefill to come
        await response.body_iterator.__anext__()
        pending = backlog.snapshot()  # the stream has its first chunk; the rest is not read yet
        await response.body_iterator.aclose()
        return response, at_head, pending

    response, at_head, pending = run(first_chunk_only())
    assert response.headers["x-pdserve-path"] == "decode_local"
    d = response.headers["x-pdserve-decode-replica"]
    assert seen == [(d, len(PROMPT), 1)]  # pending while the engine works on it
    assert at_head == {d: len(PROMPT)}
    assert pending == {}  # its first answer arrived: done, though its stream goes on
    c.router.poller.follow_kv_events()
    assert c.router.metrics.prefill_backlog_tokens.labels(d)._value.get() == 0
    # an engine lost before its first item: the request moves, and nothing stays pending
    c.engines[d].raise_first = ConnectionRefusedError("gone")
    r = run(c.serve(BODY, endpoint="completions"))
    assert r.status_code == 200 and backlog.snapshot() == {}
    # a P/D prefill leg is pending on its prefill engine until it returns
    c2 = cluster(disaggregation="always")
    seen.clear()
    for rid in ("p0", "p1", "d0", "d1"):
        c2.engines[rid].before = lambda engine, endpoint, body: seen.append(
            (engine.replica_id, c2.router.disaggregator.backlog.snapshot()))
    r = run(c2.serve(BODY, endpoint="completions"))
    assert r.headers["x-pdserve-path"] == "pd"
    p, d = r.headers["x-pdserve-prefill-replica"], r.headers["x-pdserve-decode-replica"]
    assert seen == [(p, {p: len(PROMPT)}), (d, {})]  # done when the decode leg starts: its KV is made
    assert c2.router.disaggregator.backlog.snapshot() == {}


def test_a_prefill_engine_takes_whole_requests_up_to_what_a_decode_engine_may_run_unless_bounded():
    """Unset, the bound on whole requests on a prefill engine is engine.max_num_seqs: a lower one
    left the decode engine every request past it: past the knee, half as many again as the
    prefill engine's."""
    from types import SimpleNamespace

    ctx = SimpleNamespace(selection=SelectionRequest(None, 100), checked=SimpleNamespace(prompt_tokens=100),
                          cls="standard", body={})
    d = Candidate("d0", "decode", running=40, waiting=0, inflight=40)

    def room(c, ahead: int) -> bool:
        p = Candidate("p0", "prefill", running=ahead, waiting=0, inflight=ahead)
        return c.router.disaggregator.situation(ctx, p, d).prefill_room

    c = cluster(disaggregation="adaptive")
    max_seqs = c.cfg.engine.max_num_seqs
    assert c.cfg.router.decider.prefill_whole_max_running is None
    assert room(c, 40) and room(c, max_seqs - 1) and not room(c, max_seqs)
    bounded = cluster(disaggregation="adaptive", decider={"prefill_whole_max_running": 32})
    assert room(bounded, 31) and not room(bounded, 32)
