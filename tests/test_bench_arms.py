"""Benchmark arms (bench/arms.py) and ``pdserve ab --arms``, without clusters: names and overrides
resolve to validated configs, bad ones fail with a clear CLI error before anything starts, and
the report names the two arms it compared."""
from __future__ import annotations

import json

import pytest

from pdserve.bench import ab
from pdserve.bench.arms import ARMS, ArmError, merge, parse_override, resolve
from pdserve.cluster.cli import main as pdserve_main


def test_the_four_named_arms():
    got = {name: resolve(name).cfg for name in ARMS}
    assert set(got) == {"mono-least-loaded", "mono-cache-aware", "pd-always", "pd-adaptive"}
    mono, mono_cache, pd, adaptive = (got[n] for n in ARMS)
    assert mono.mode == mono_cache.mode == "monolithic" and pd.mode == adaptive.mode == "pd"
    assert not mono.router.selection.uses("prefix") and not pd.router.selection.uses("prefix")
    assert mono_cache.router.selection.for_pool("monolithic").uses("prefix")
    assert pd.router.disaggregation == "always" and adaptive.router.disaggregation == "adaptive"
    assert adaptive.router.selection.for_pool("prefill").uses("prefix")
    assert adaptive.router.selection.for_pool("decode").uses("prefix")
    assert all(c.engine.enable_prefix_caching for c in got.values())
    # the same two cores in every arm
    assert {ab.hardware_budget(c) for c in got.values()} == {("cpu", 2.0)}


def test_overrides_lay_dotted_yaml_values_on_a_config():
    assert parse_override("router.decider.min_samples=5") == {"router": {"decider": {"min_samples": 5}}}
    assert parse_override("slo={ttft_ms: 300}") == {"slo": {"ttft_ms": 300}}
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 3}, "d": [2]}) == {"a": {"b": 3, "c": 2}, "d": [2]}
    arm = resolve("configs/cpu-pd.yaml", ["router.disaggregation=always", "slo.ttft_ms=300"])
    assert arm.cfg.router.disaggregation == "always" and arm.cfg.slo.ttft_ms == 300
    assert arm.cfg.slo.tpot_ms == 50  # untouched keys stay
    assert arm.config_path == "configs/cpu-pd.yaml" and "router.disaggregation=always" in arm.label
    assert "disaggregation: always" in arm.text
    text = resolve("pd-adaptive").text  # both pools' prefix scorer written out, not as a YAML alias
    assert "&id" not in text and text.count("- name: prefix") == 2
    # overrides on a named arm go on top of its own
    arm = resolve("pd-adaptive", ["router.decider.slo_headroom=0.5"])
    assert arm.cfg.router.disaggregation == "adaptive" and arm.cfg.router.decider.slo_headroom == 0.5


@pytest.mark.parametrize("spec, overrides, message", [
    ("pd-sometimes", [], "unknown arm 'pd-sometimes': give one of mono-least-loaded"),
    ("configs/none.yaml", [], "config file not found"),
    ("pd-always", ["router.disaggregation"], "is not KEY=VALUE"),
    ("pd-always", ["router.disaggregation=sometimes"], "does not make a valid config"),
    ("pd-always", ["router.no_such_key=1"], "does not make a valid config"),
])
def test_bad_arms_are_refused(spec, overrides, message):
    with pytest.raises(ArmError, match=message):
        resolve(spec, overrides)


def _no_cluster(*a, **k):
    raise AssertionError("pdserve ab must not start a cluster when it refuses")


@pytest.mark.parametrize("argv, message", [
    (["--arms", "mono-least-loaded,pd-turbo"], "unknown arm 'pd-turbo'"),
    (["--arms", "mono-least-loaded"], "--arms takes two arms"),
    (["--arms", "mono-least-loaded,pd-adaptive", "--pd-config", "configs/cpu-pd.yaml"], "not both"),
    (["--arms", "mono-least-loaded,pd-adaptive", "--set-b", "router.disaggregation=maybe"], "valid config"),
    (["--arms", "mono-least-loaded,pd-always", "--set-b", 'decode.cpu_cores=["1-2"]'], "refusing to compare"),
])
def test_ab_refuses_bad_arms_before_starting_anything(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ab, "run_arm", _no_cluster)
    assert pdserve_main(["ab", *argv, "--rates", "1", "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _synthetic_sweep(rate_scale: float) -> dict:
    runs = []
    for i, rate in enumerate((0.5, 1.0)):
        n = 10
        runs.append({"request_rate": rate * 5, "session_rate": rate, "request_goodput": rate * 5 * rate_scale,
                     "slo_attainment": 0.95, "burstiness": 1.0, "max_concurrency": None, "completed": n,
                     "num_prompts": n, "request_throughput": rate * 5, "output_throughput": 100.0,
                     "p50_ttft_ms": 40.0, "p95_ttft_ms": 80.0, "p50_tpot_ms": 4.0, "p95_tpot_ms": 6.0,
                     "fallback_fraction": 0.0, "prefix_cache_hit_rate": 0.5 + 0.1 * i, "ttfts": [0.04] * n,
                     "latencies": [0.3] * n, "output_lens": [64] * n, "errors": [""] * n,
                     "itls": [[0.004] * 63] * n})
    return {"workload": "multi-turn: synthetic", "endpoint": "chat", "model_id": "tiny",
            "goodput_slos_ms": {"ttft": 500.0, "tpot": 50.0}, "runs": runs}


def test_ab_named_arms_sweep_each_resolved_config_and_name_them_in_the_report(tmp_path, monkeypatch):
    seen = []

    def fake_run_arm(args, name, config_path, url, cfg, slos, config_text=None, label=None):
        seen.append((name, config_path, url, cfg, slos, config_text, label))
        return dict(_synthetic_sweep(1.0 if name == "pd-adaptive" else 0.8),
                    arm={"name": name, "label": label, "source": f"synthetic {name}", "config_path": config_path,
                         "config_text": config_text})

    monkeypatch.setattr(ab, "run_arm", fake_run_arm)
    rc = pdserve_main(["ab", "--arms", "mono-least-loaded,pd-adaptive", "--set-b", "router.decider.min_samples=5",
                       "--workload", "multi-turn", "--rates", "0.5,1", "--out", str(tmp_path / "o")])
    assert rc == 0
    (a, a_path, a_url, a_cfg, slos, a_text, a_label), (b, b_path, _, b_cfg, _, b_text, b_label) = seen
    assert (a, a_path, a_url, a_cfg.mode) == ("mono-least-loaded", "configs/cpu-monolithic.yaml", None, "monolithic")
    assert (b, b_path, b_cfg.router.disaggregation, b_cfg.router.decider.min_samples) == (
        "pd-adaptive", "configs/cpu-pd.yaml", "adaptive", 5)
    assert slos == {"ttft": 500.0, "tpot": 50.0}  # the first arm's config's slo section
    assert "min_samples: 5" in b_text and a_label == "monolithic least-loaded"
    out = tmp_path / "o"
    text = (out / "summary.md").read_text()
    assert text.startswith(f"# pdserve A/B: monolithic least-loaded vs {b_label}")
    assert "sessions/s (offered req/s)" in text and "| 0.5 (2.5) | monolithic least-loaded |" in text
    assert "60.0%" in text  # the prefix cache hit rate column
    assert "`mono-least-loaded.json`, `pd-adaptive.json`" in text
    saved = json.loads((out / "pd-adaptive.json").read_text())
    assert saved["arm"]["budget"] == "2 CPU cores" and saved["goodput_knee"]["threshold"] == 0.9
    # the per-token gaps are left out of the report's JSON; the per-request lists its plots use stay
    assert all("itls" not in r and len(r["ttfts"]) == 10 for r in saved["runs"])
    assert not (out / "pd.json").exists()
