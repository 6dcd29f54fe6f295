"""The serving-cost benchmark's pieces that need no server: the one-engine config it runs
pdserve with, and the ratios it prints (pdserve over vLLM, medians of the runs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.serving_cost import FIGURES, one_engine, summarize
from pdserve.settings.cluster import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pdserve_runs_one_engine_on_the_given_core_without_autoscaling():
    cfg = one_engine(load_config(ROOT / "configs" / "cpu-monolithic.yaml"), 1)
    assert cfg.mode == "monolithic"
    assert cfg.monolithic.replicas == 1 and cfg.monolithic.cpu_cores == ["1"]
    assert cfg.monolithic.autoscaling is None


def test_both_servers_run_the_engine_without_its_prefix_cache_unless_asked():
    from pdserve.bench.vllm_server import server_command

    shipped = load_config(ROOT / "configs" / "cpu-monolithic.yaml")
    assert shipped.engine.enable_prefix_caching
    off = one_engine(shipped, 1)
    assert not off.engine.enable_prefix_caching
    assert "--no-enable-prefix-caching" in server_command(off, port=8000)
    on = one_engine(shipped, 1, prefix_caching=True)
    assert on.engine.enable_prefix_caching
    assert "--enable-prefix-caching" in server_command(on, port=8000)


def test_a_config_that_routes_on_the_prefix_cache_needs_it_kept_on(capsys):
    from pdserve.bench.serving_cost import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(ROOT / "configs" / "cpu-pd.yaml")])
    assert e.value.code == 2
    assert "--prefix-caching" in capsys.readouterr().err


def test_ratios_are_pdserve_over_vllm_of_the_run_medians():
    def run(ttft, tpot):
        return {k: (ttft if "ttft" in k else tpot) for k in FIGURES}

    report = summarize({"vllm-confined": [run(20, 5), run(30, 5), run(25, 6)], "vllm-free": [run(20, 4)],
                        "pdserve": [run(33, 6), run(27, 5.5)]})
    assert report["medians"]["vllm-confined"]["median_ttft_ms"] == 25
    assert report["ratios"]["vllm-confined"]["median_ttft_ms"] == pytest.approx(30 / 25)
    assert report["ratios"]["vllm-confined"]["median_tpot_ms"] == pytest.approx(5.75 / 5)
    assert report["ratios"]["vllm-free"]["median_tpot_ms"] == pytest.approx(5.75 / 4)
    assert set(report["ratios"]) == {"vllm-confined", "vllm-free"}
    # per round: 33/20 and 27/30, median of the two
    assert report["paired_ratios"]["vllm-confined"]["median_ttft_ms"] == pytest.approx((33 / 20 + 27 / 30) / 2)


def test_each_server_serves_other_prompts_unmeasured_before_its_measured_run(monkeypatch):
    from pdserve.bench import serving_cost

    calls = []

    def fake_client(url, model, **client):
        calls.append((client["num_prompts"], client["seed"]))
        return {"run": len(calls)}

    monkeypatch.setattr(serving_cost, "vllm_bench_serve", fake_client)
    client = {"num_prompts": 100, "seed": 7, "rate": 4.0}
    assert serving_cost.warm_then_measure("http://x", "tiny", client, 30) == {"run": 2}  # the second run's figures
    assert calls == [(30, 8), (100, 7)]  # other prompts first (seed + 1): no prefix-cache hit in the measured run
    calls.clear()
    assert serving_cost.warm_then_measure("http://x", "tiny", client, 0) == {"run": 1} and calls == [(100, 7)]


def test_a_negative_warmup_is_refused_with_a_message(capsys):
    from pdserve.bench import serving_cost

    with pytest.raises(SystemExit):
        serving_cost.main(["--warmup-prompts", "-1"])
    assert "--warmup-prompts must be >= 0" in capsys.readouterr().err
