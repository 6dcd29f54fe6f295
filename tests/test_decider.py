"""The adaptive disaggregation decider (router/decider.py) on hand-made measurements, and the
measurements it reads (router/measure.py) from hand-made observations."""
from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.router.decider import Line, Measurements, Situation, added_latency, decide, predict
from pdserve.router.measure import EwmaLine, LiveMeasurements

# A cluster as measured: 50 us per prompt token on either pool (+5 ms), KV at 1 GB/s (+2 ms),
# decode steps of 10 ms + 1 ms per running request, 100-token answers, prefill engines idle.
M = Measurements(prefill={"pd": Line(0.005, 50e-6), "prefill": Line(0.005, 50e-6), "decode": Line(0.005, 50e-6)},
                 transfer=Line(0.002, 1e-9), decode_step=Line(0.010, 0.001), prefill_busy=0.0,
                 output_tokens=100, ready=True)
SHORT = replace(M, output_tokens=20)  # short answers: a stall weighs on few tokens
SLO = dict(kv_bytes_per_token=1024, ttft_slo_s=0.5, tpot_slo_s=0.05, running_tpot_slo_s=0.05, headroom=0.8)


def situation(**kw) -> Situation:
    return Situation(**{"prompt_tokens": 1000, **SLO, **kw})


def test_too_few_measurements_keep_pd():
    d = decide(Measurements(ready=False), situation())
    assert (d.way, d.reason) == ("pd", "warmup")


def test_an_idle_cluster_serves_whole_on_the_decode_engine_the_cheapest_way():
    d = decide(M, situation())  # 1000 tokens: 55 ms prefill, well inside 500 ms
    assert (d.way, d.reason) == ("decode_local", "cheapest")
    local, pd = d.predictions["decode_local"], d.predictions["pd"]
    assert local.ttft_s == pytest.approx(0.005 + 0.05 + 0.011)
    assert pd.ttft_s == pytest.approx(0.055 + 0.002 + 1000 * 1024 * 1e-9 + 0.011)


def test_a_local_prefill_that_would_slow_running_decodes_past_their_tpot_goes_pd():
    # 6000 uncached tokens: 305 ms of prefill, spread over the 10 tokens each running decode has left
    d = decide(SHORT, situation(prompt_tokens=6000, decode_running=4))
    assert (d.way, d.reason) == ("pd", "decode_local_running_tpot")
    assert d.predictions["decode_local"].running_tpot_s > 0.04 >= d.predictions["pd"].running_tpot_s


def test_the_same_prompt_cached_on_the_decode_engine_stays_local():
    d = decide(SHORT, situation(prompt_tokens=6000, decode_running=4, decode_cached=5984))
    assert (d.way, d.reason) == ("decode_local", "cheapest")


def test_with_nothing_running_there_a_long_prefill_only_has_to_meet_ttft():
    assert decide(M, situation(prompt_tokens=7000)).way == "decode_local"  # 355 ms + a step: under 400
    d = decide(M, situation(prompt_tokens=7000, decode_waiting=1))  # it would share the engine: ~720 ms
    assert (d.way, d.reason) == ("pd", "decode_local_ttft")


def test_a_prefill_engine_with_room_takes_the_request_whole_before_pd():
    busy = situation(prompt_tokens=6000, decode_running=4, prefill_room=True)
    d = decide(SHORT, busy)
    assert (d.way, d.reason) == ("prefill_whole", "decode_local_running_tpot")
    # without room it is P/D
    assert decide(SHORT, situation(prompt_tokens=6000, decode_running=4, prefill_room=False)).way == "pd"
    # a prefill engine that prefills most of the time would decode too slowly
    d = decide(replace(SHORT, prefill_busy=0.9), busy)
    assert d.way == "pd" and d.predictions["prefill_whole"].tpot_s > 0.04


def test_a_slow_decode_step_misses_tpot_every_way_and_the_least_miss_wins():
    slow = replace(M, decode_step=Line(0.060, 0.001))
    d = decide(slow, situation(prefill_room=True, decode_running=2))
    assert d.reason == "best_effort"
    overshoot = {w: p.overshoot(situation(prefill_room=True, decode_running=2)) for w, p in d.predictions.items()}
    assert d.way != "pd" and overshoot[d.way] == min(overshoot["decode_local"], overshoot["prefill_whole"])


def test_past_every_slo_the_cheaper_whole_way_wins_even_where_pd_misses_by_less():
    # the decode engine's steps miss TPOT whatever is done; P/D would add a transfer's work
    slow = replace(M, decode_step=Line(0.060, 0.001))
    s = situation(prompt_tokens=6000, decode_running=2, prefill_room=False)
    d = decide(slow, s)
    assert (d.way, d.reason) == ("decode_local", "best_effort")
    assert d.predictions["pd"].overshoot(s) < d.predictions["decode_local"].overshoot(s)


def test_a_pd_prefill_stalls_the_whole_requests_decoding_on_the_prefill_engine():
    s = situation(prompt_tokens=6000, prefill_ahead=3, prefill_running=3)
    pd, whole = (predict(SHORT, s)[w] for w in ("pd", "prefill_whole"))
    # the P/D prefill also waits behind the three P/D prefills or whole requests ahead of it
    assert pd.running_tpot_s > SLO["running_tpot_slo_s"] and pd.running_tpot_s > whole.running_tpot_s > 0
    assert predict(SHORT, situation(prompt_tokens=6000))["pd"].running_tpot_s == 0.0


def test_the_requests_class_slo_decides():
    tight = situation(prompt_tokens=4000, ttft_slo_s=0.2)  # local: 216 ms; P/D: 216 ms + transfer
    d = decide(M, tight)
    assert d.reason == "best_effort"  # neither fits 80 % of 200 ms
    loose = situation(prompt_tokens=4000, ttft_slo_s=1.0)
    assert decide(M, loose).way == "decode_local"


def test_cached_tokens_only_on_the_prefill_engine_shorten_the_pd_prefill():
    p = predict(M, situation(prompt_tokens=4000, prefill_cached=3968))
    q = predict(M, situation(prompt_tokens=4000))
    assert p["pd"].ttft_s < q["pd"].ttft_s and p["decode_local"] == q["decode_local"]


def test_requests_ahead_on_the_prefill_engine_share_its_steps():
    p = predict(M, situation(prefill_ahead=3))
    assert p["pd"].ttft_s == pytest.approx(4 * 0.055 + 0.002 + 1024e-6 + 0.011)


def test_a_pd_fit_left_from_idle_time_does_not_undercut_the_prefill_engine_as_it_is_now():
    # the prefill engine's whole requests now prefill at 200 us a token; the P/D fit still says 50
    loaded = replace(M, prefill={**M.prefill, "prefill": Line(0.005, 200e-6)})
    p = predict(loaded, situation(prefill_waiting=1))
    assert p["pd"].ttft_s == pytest.approx(2 * 0.205 + 0.002 + 1024e-6 + 0.011)
    assert p["pd"].ttft_s > predict(M, situation(prefill_waiting=1))["pd"].ttft_s


# ---------------------------------------------------------------------------- the measurements


def test_an_ewma_line_recovers_a_line_and_follows_a_change():
    line = EwmaLine(alpha=0.3)
    for x in (100, 200, 400, 800, 100, 300):
        line.add(x, 0.005 + 50e-6 * x)
    fit = line.line()
    assert fit.fixed == pytest.approx(0.005) and fit.slope == pytest.approx(50e-6)
    for _ in range(60):  # the engine got twice as slow per token
        for x in (100, 800):
            line.add(x, 0.005 + 100e-6 * x)
    assert line.line().slope == pytest.approx(100e-6, rel=0.01)


def test_one_size_of_sample_gives_a_ratio_through_the_origin():
    line = EwmaLine(alpha=0.5)
    for _ in range(3):
        line.add(1000, 0.05)
    assert line.line() == Line(0.0, 0.05 / 1000)


def test_a_fit_sloping_down_falls_back_to_the_mean_flat():
    # cached conversations: short prefills whose time the queue decides, not their length
    line = EwmaLine(alpha=0.5)
    for x, y in ((60, 0.050), (70, 0.045), (130, 0.040)):
        line.add(x, y)
    fit = line.line()
    assert fit.slope == 0.0 and 0.040 < fit.fixed < 0.050
    assert fit.at(1000) < 0.05  # not the 0.7 ms per token a ratio through the origin would give


def test_a_fit_below_zero_at_the_origin_falls_back_to_the_mean_ratio():
    line = EwmaLine(alpha=0.5)
    for x, y in ((100, 0.001), (1000, 0.2), (1100, 0.25)):  # a steep fit would cross zero near x = 100
        line.add(x, y)
    fit = line.line()
    assert fit.fixed == 0.0 and fit.slope > 0 and fit.at(100) > 0


def test_live_measurements_are_ready_after_enough_of_each_sample():
    m = LiveMeasurements(alpha=0.5, min_samples=2)
    m.prefill_done("pd", 1000, 0.2, ahead=1)  # shared with one other request: 0.1 s alone
    m.prefill_done("pd", 2000, 0.2)
    m.transfers(2, 2_000_000, 0.004)  # two pulls since the last poll: 1 MB and 2 ms each
    m.decoded(0.012, running=2, output_tokens=50)
    assert not m.snapshot().ready
    m.transfers(1, 4_000_000, 0.006)
    m.decoded(0.014, running=4, output_tokens=150)
    s = m.snapshot()
    assert s.ready and s.prefill["decode"] is None and s.prefill["prefill"] is None
    assert s.prefill["pd"].at(1000) == pytest.approx(0.1) and s.prefill["pd"].at(2000) == pytest.approx(0.2)
    assert s.transfer.at(1_000_000) == pytest.approx(0.002) and s.transfer.at(4_000_000) == pytest.approx(0.006)
    assert s.decode_step.at(3) == pytest.approx(0.013)
    assert s.output_tokens == pytest.approx(100)
    gauges = m.gauges()
    assert gauges["ready"] == 1.0 and gauges["kv_transfer_seconds_per_byte"] == pytest.approx(s.transfer.slope)


def test_the_prefill_busy_share_comes_from_prefill_time_per_poll_interval():
    now = [0.0]
    m = LiveMeasurements(alpha=1.0, clock=lambda: now[0])
    m.poll(prefill_replicas=2)
    m.prefill_done("pd", 100, 0.5)
    m.prefill_done("pd", 100, 0.3)
    m.prefill_done("prefill", 100, 0.9)  # a whole request's: its stall is in the decode step fit
    m.prefill_done("decode", 100, 0.9)
    now[0] = 1.0
    m.poll(prefill_replicas=2)
    assert m.snapshot().prefill_busy == pytest.approx(0.4)  # 0.8 s of prefill over 2 engine-seconds


# ---------------------------------------------------------------------------- both pools serve whole


def test_of_two_whole_ways_that_meet_the_slos_the_less_loaded_engine_wins():
    # the decode engine runs 30 decodes (40 ms steps: tight on a 50 ms TPOT); the prefill engine 2
    d = decide(M, situation(decode_running=30, prefill_ahead=2, prefill_running=2, prefill_room=True,
                            tpot_slo_s=0.1, running_tpot_slo_s=0.1))
    assert (d.way, d.reason) == ("prefill_whole", "least_loaded")
    # on an idle cluster the two tie, and the tie goes to the decode engine
    assert decide(M, situation(prefill_room=True)).way == "decode_local"


def test_of_two_whole_ways_that_meet_the_slos_the_engine_holding_the_conversation_wins():
    # steps that barely grow with load (0.2 ms per request); the decode engine holds 900 of the
    # prompt's 1000 tokens and runs 3 requests, the prefill engine holds none and runs 2. Their
    # largest prediction-to-SLO ratios are TPOT ones, which do not see the cache, within the tie
    # margin of each other: on them alone the engine with fewer requests would win
    flat = replace(M, decode_step=Line(0.010, 0.0002))
    s = situation(decode_cached=900, decode_running=3, prefill_running=2, prefill_ahead=2, prefill_room=True,
                  tie_margin=0.05)
    p = predict(flat, s)
    assert abs(p["prefill_whole"].overshoot(s) - p["decode_local"].overshoot(s)) < 0.05
    d = decide(flat, s)
    assert (d.way, d.reason) == ("decode_local", "cheapest")
    assert added_latency(flat, s, "decode_local", p["decode_local"]) < added_latency(
        flat, s, "prefill_whole", p["prefill_whole"])


def test_of_two_whole_ways_that_meet_the_slos_a_much_busier_engine_loses_its_conversation():
    # 100-token answers; the decode engine holds 900 tokens of the prompt but runs 8 requests,
    # the prefill engine holds none and runs 2: its first token comes later (68 against 29 ms),
    # but one more request on the busy engine slows eight others for 100 steps
    s = situation(decode_cached=900, decode_running=8, prefill_running=2, prefill_ahead=2, prefill_room=True)
    p = predict(M, s)
    assert p["decode_local"].ttft_s < p["prefill_whole"].ttft_s
    assert added_latency(M, s, "decode_local", p["decode_local"]) == pytest.approx(
        0.029 + 100 * 0.019 + 8 * (0.010 + 100 * 0.001))
    d = decide(M, s)
    assert (d.way, d.reason) == ("prefill_whole", "least_loaded")


def test_a_whole_prefill_on_the_prefill_engine_stalls_the_decodes_it_runs():
    alone = predict(SHORT, situation(prompt_tokens=8000, prefill_room=True))["prefill_whole"]
    shared = predict(SHORT, situation(prompt_tokens=8000, prefill_room=True, prefill_ahead=1,
                                      prefill_running=1))["prefill_whole"]
    assert alone.running_tpot_s == 0.0
    assert shared.running_tpot_s > SLO["running_tpot_slo_s"]  # 405 ms spread over 10 tokens, + a step


def test_the_two_whole_ways_are_predicted_alike_for_the_same_load():
    # both engines run 4 requests (on the prefill engine: whole ones decoding) and queue none
    same = situation(prompt_tokens=2000, prefill_room=True, decode_running=4, prefill_running=4, prefill_ahead=4)
    p = predict(M, same)
    assert p["prefill_whole"] == p["decode_local"]
    assert decide(M, same).way == "decode_local"  # the tie goes to the decode engine
    # one request queued on the decode engine: its prefill waits, the prefill engine's does not
    d = decide(M, replace(same, decode_waiting=1))
    assert (d.way, d.reason) == ("prefill_whole", "least_loaded")
    # requests running on the prefill engine slow its decode steps, not its prefill's start
    busier = predict(M, replace(same, prefill_running=8, prefill_ahead=8))["prefill_whole"]
    assert busier.tpot_s > p["prefill_whole"].tpot_s and busier.ttft_s - busier.tpot_s == pytest.approx(
        p["prefill_whole"].ttft_s - p["prefill_whole"].tpot_s)


def test_prefills_pending_on_an_engine_delay_a_request_by_their_tokens_not_by_one_prefill_each():
    # three 1000-token prefills sent to the decode engine and not done: 3000 tokens ahead, the
    # fixed 5 ms paid once (the engine prefills them together), not 4 x 55 ms
    p = predict(M, situation(decode_tokens_ahead=3000))["decode_local"]
    assert p.ttft_s == pytest.approx(0.005 + 50e-6 * 4000 + 0.011)
    assert p.ttft_s < predict(M, situation(decode_waiting=3))["decode_local"].ttft_s
    # the same backlog on the prefill engine: its whole way and its P/D prefill leg both wait for it
    q = predict(M, situation(prefill_tokens_ahead=3000, prefill_room=True))
    assert q["prefill_whole"].ttft_s == pytest.approx(0.005 + 50e-6 * 4000 + 0.011)
    assert q["pd"].ttft_s == pytest.approx(0.205 + 0.002 + 1024e-6 + 0.011)
    # of two otherwise equal engines, the one without the backlog takes the request
    same = situation(prompt_tokens=2000, prefill_room=True, decode_running=4, prefill_running=4)
    assert decide(M, same).way == "decode_local"
    d = decide(M, replace(same, decode_tokens_ahead=1500))
    assert (d.way, d.reason) == ("prefill_whole", "least_loaded")


def test_admission_counts_the_prefill_pool_when_adaptive_serves_whole_there():
    from pdserve.router.core import Router
    from pdserve.settings.cluster import load_config

    adaptive = load_config("configs/cpu-pd.yaml")  # shipped adaptive
    assert adaptive.router.disaggregation == "adaptive"
    cfg = adaptive.model_copy(update={"router": adaptive.router.model_copy(update={"disaggregation": "always"})})
    assert Router.serving_replicas(cfg) == cfg.decode.max_replicas
    assert Router.serving_replicas(adaptive) == cfg.decode.max_replicas + cfg.prefill.max_replicas
    no_room = adaptive.router.decider.model_copy(update={"prefill_whole_max_running": 0})
    pinned = adaptive.model_copy(update={"router": adaptive.router.model_copy(update={"decider": no_room})})
    assert Router.serving_replicas(pinned) == cfg.decode.max_replicas


def test_past_every_slo_whole_ways_within_the_tie_margin_go_to_the_engine_with_fewer_requests():
    # every step misses TPOT; the decode engine holds all but 10 tokens of the prompt, so its
    # local prefill stalls its decodes less, but it runs 5 requests to the prefill engine's 4
    slow = replace(M, decode_step=Line(0.060, 0.001), output_tokens=40)
    s = situation(decode_running=5, decode_cached=990, prefill_running=4, prefill_ahead=4, prefill_room=True,
                  ttft_slo_s=5.0)
    assert decide(slow, s).way == "decode_local"  # no margin: the smaller miss wins
    d = decide(slow, replace(s, tie_margin=0.05))
    assert (d.way, d.reason) == ("prefill_whole", "best_effort")
    # a miss smaller by more than the margin still wins (shorter answers: a stall weighs more)
    assert decide(replace(slow, output_tokens=20), replace(s, tie_margin=0.05)).way == "decode_local"
