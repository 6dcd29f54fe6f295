"""Offline planner: model memory math, Little's Law, the parallelism tree, ``pdserve plan``."""
from __future__ import annotations

import argparse
import json

import pytest

from pdserve.planner import littles_law as ll
from pdserve.planner.cli import add_parser
from pdserve.planner.decide import Accelerator, choose_parallelism, pd_worth_it
from pdserve.planner.model_math import GIB, PRESETS, kv_transfer, load_model_config, load_shape, shape_from_config

H100 = Accelerator(mem_gib=80, mem_bw_gbps=3350, gpus_per_node=8)


# --- model math -------------------------------------------------------------------------

def test_llama3_70b_kv_per_token_and_128k_request():
    s = load_shape("llama-3-70b")
    assert s.kv_bytes_per_token == 327_680  # 2 × 80 layers × 8 KV heads × 128 × 2 bytes
    assert s.kv_bytes(131_072) / GIB == 40.0


def test_kv_transfer_70b_at_10k_context_is_about_3_gib():
    t = kv_transfer(load_shape("llama-3-70b"), 10_000, link_gbps=50)
    assert round(t.gib, 1) == 3.1 and abs(t.gib - 3.0) < 0.06
    assert t.seconds == pytest.approx(3_276_800_000 / 50e9)


@pytest.mark.parametrize("name, total_b, active_b", [
    ("llama-3-8b", 8.03, 8.03), ("llama-3-70b", 70.55, 70.55), ("llama-3.1-405b", 405.85, 405.85),
    ("mixtral-8x7b", 46.70, 12.88), ("deepseek-v3", 671.03, 37.55),
])
def test_parameter_counts_match_published_sizes(name, total_b, active_b):
    p = load_shape(name).param_counts()
    assert p.total / 1e9 == pytest.approx(total_b, abs=0.01)
    assert p.active / 1e9 == pytest.approx(active_b, abs=0.01)


def test_moe_and_mla_are_recognised():
    mixtral, ds, llama = load_shape("mixtral-8x7b"), load_shape("deepseek-v3"), load_shape("llama-3-8b")
    assert mixtral.is_moe and ds.is_moe and not llama.is_moe
    assert ds.is_mla and ds.kv_bytes_per_token == 61 * (512 + 64) * 2
    assert ds.weight_bytes_per_param == 1  # quantization_config fp8


def test_builtin_tiny_presets_match_engine_tiny_model():
    assert load_shape("tiny").kv_bytes_per_token == 1024        # 2 layers × 2 KV heads × 64 × 2 × 2 B
    assert load_shape("tiny-wide").kv_bytes_per_token == 32 * 1024


def test_head_dim_and_kv_heads_fall_back_and_dtype_overrides():
    cfg = {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "vocab_size": 1000,
           "torch_dtype": "float32"}
    s = shape_from_config(cfg)
    assert (s.head_dim, s.n_kv_heads) == (64, 8)
    assert s.kv_bytes_per_token == 2 * 4 * 8 * 64 * 4
    assert shape_from_config(cfg, dtype="bf16").kv_bytes_per_token == 2 * 4 * 8 * 64 * 2
    assert shape_from_config(cfg, kv_dtype="fp8").kv_bytes_per_token == 2 * 4 * 8 * 64


def test_model_config_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-3-8b"]))
    name, cfg = load_model_config(str(tmp_path))
    assert name == tmp_path.name and cfg["num_key_value_heads"] == 8


@pytest.mark.parametrize("cfg, message", [
    ({"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10}, "layer count"),
    ({"num_hidden_layers": 2, "hidden_size": 10, "num_attention_heads": 3, "vocab_size": 10}, "head_dim"),
    ({"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10,
      "torch_dtype": "float13"}, "unknown dtype"),
])
def test_bad_model_configs_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        shape_from_config(cfg)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="llama-3-70b"):
        load_model_config("no-such-model")


# --- Little's Law -----------------------------------------------------------------------

def test_playbook_worked_autoscaling_example():
    assert ll.in_flight(6, 12) == 72
    assert ll.replicas_needed(6, 12, 24, 0.75) == 4  # 72 / 18, not 5 from float error
    assert ll.queue_threshold(24, 0.75) == 6
    p = ll.plan(6, 12, 24, 0.75)
    assert (p.in_flight, p.usable_per_replica, p.replicas, p.queue_threshold) == (72, 18, 4, 6)


def test_replicas_round_up_and_clamp():
    assert ll.replicas_needed(6.1, 12, 24, 0.75) == 5
    assert ll.replicas_needed(0, 12, 24, 0.75) == 1
    assert ll.replicas_needed(0, 12, 24, 0.75, min_replicas=0) == 0
    assert ll.replicas_needed(100, 12, 24, 0.75, max_replicas=10) == 10
    assert ll.queue_threshold(24, 0.7) == 7.2  # not 7.200000000000001
    assert 0.1 * 3 / 0.3 > 1 and ll.replicas_needed(0.1, 3, 0.3, 1.0) == 1  # float error must not add a replica


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    assert ll.replicas_needed(np.float64(6), np.int64(12), np.int64(24), 0.75, min_replicas=np.int64(1)) == 4


def test_service_time():
    assert ll.service_time(0.5, 300, 0.05) == 15.5


@pytest.mark.parametrize("call, message", [
    (lambda: ll.replicas_needed(6, 12, 24, 0), "safety"),
    (lambda: ll.replicas_needed(6, 12, 24, 1.2), "safety"),
    (lambda: ll.replicas_needed(6, 12, 0, 0.75), "c_knee"),
    (lambda: ll.replicas_needed(-1, 12, 24, 0.75), "lam"),
    (lambda: ll.replicas_needed(6, float("nan"), 24, 0.75), "finite"),
    (lambda: ll.replicas_needed(6, 12, 24, 0.75, min_replicas=3, max_replicas=2), "max_replicas"),
    (lambda: ll.queue_threshold(24, True), "safety"),
    (lambda: ll.service_time(0.5, -1, 0.05), "output_tokens"),
])
def test_bad_scaling_inputs_raise_named_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- parallelism and P/D ----------------------------------------------------------------

def test_8b_on_80_gib_is_data_parallel():
    c = choose_parallelism(load_shape("llama-3-8b"), H100, 8192)
    assert (c.strategy, c.tp, c.pp, c.ep, c.fits) == ("DP", 1, 1, 1, True)


def test_70b_on_80_gib_is_tensor_parallel_within_a_node():
    c = choose_parallelism(load_shape("llama-3-70b"), H100, 8192)
    assert (c.strategy, c.tp, c.pp, c.nodes_per_replica) == ("TP", 4, 1, 1)  # TP=2 leaves no room
    assert "exceed one accelerator" in c.reasons[0]


def test_405b_spans_two_nodes_with_tp_times_pp():
    c = choose_parallelism(load_shape("llama-3.1-405b"), H100, 8192, max_nodes=2)
    assert (c.strategy, c.tp, c.pp, c.nodes_per_replica, c.fits) == ("TP×PP", 8, 2, 2, True)
    assert c.label == "TP=8 × PP=2"


def test_405b_that_cannot_fit_says_so():
    c = choose_parallelism(load_shape("llama-3.1-405b"), Accelerator(24, 1000, 8), 8192, max_nodes=2)
    assert not c.fits and "do not fit" in c.reasons[-1]
    one_node = choose_parallelism(load_shape("llama-3.1-405b"), H100, 8192, max_nodes=1)
    assert (one_node.strategy, one_node.label, one_node.fits) == ("TP", "TP=8", False)


def test_mixtral_uses_expert_parallelism():
    c = choose_parallelism(load_shape("mixtral-8x7b"), H100, 8192)
    assert (c.strategy, c.tp, c.ep) == ("TP", 2, 2)
    assert "EP=2" in c.label and any("expert parallelism" in r for r in c.reasons)


def test_pd_needs_a_measured_reason_and_a_transfer_inside_the_budget():
    t = kv_transfer(load_shape("llama-3-70b"), 10_000, link_gbps=50)  # ~66 ms
    no = pd_worth_it(t, 500)
    assert no.feasible and not no.worth_it and any("no adoption criterion" in r for r in no.reasons)
    yes = pd_worth_it(t, 500, prefill_interference=True)
    assert yes.worth_it and any("prefill interference" in r for r in yes.reasons)
    slow = pd_worth_it(kv_transfer(load_shape("llama-3-70b"), 10_000, link_gbps=5), 500, split_sku=True)
    assert not slow.feasible and not slow.worth_it and any("exceeds the TTFT SLO" in r for r in slow.reasons)


# --- the CLI ----------------------------------------------------------------------------

def _plan(argv):
    p = argparse.ArgumentParser(prog="pdserve")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["plan", *argv])
    return args.fn(args)


BASE = ["--model-config", "llama-3-70b", "--rate", "6", "--context-len", "10000", "--avg-output-tokens", "300",
        "--accel-mem-gib", "80", "--gpus-per-node", "8", "--link-gbps", "50"]


def test_plan_end_to_end_through_pdserve_main(tmp_path, capsys):
    from pdserve.cluster.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", *BASE, "--c-knee", "24", "--ttft-slo-ms", "500", "--tpot-slo-ms", "38.33333333",
                 "--safety", "0.75", "--json-out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["model"]["kv_bytes_per_token"] == 327_680
    assert plan["parallelism"]["label"] == "TP=4"
    assert plan["scaling"]["replicas"] == 4 and plan["scaling"]["queue_threshold"] == 6
    assert plan["pd"]["worth_it"] is False and plan["kv_transfer"]["gib"] == pytest.approx(3.05, abs=0.01)
    text = capsys.readouterr().out
    for needle in ("KV per token       327,680 B", "parallelism: TP=4", "replicas = 4", "queue threshold",
                   "P/D worth it: no", str(out)):
        assert needle in text


def test_plan_derives_c_knee_from_kv_capacity(tmp_path):
    out = tmp_path / "p.json"
    assert _plan([*BASE, "--json-out", str(out)]) == 0
    s = json.loads(out.read_text())["scaling"]
    assert s["c_knee_source"].startswith("derived") and 1 <= s["c_knee"] <= 256


@pytest.mark.parametrize("extra, message", [
    (["--safety", "1.5"], "--safety"),
    (["--rate", "-1"], "--rate"),
    (["--accel-mem-gib", "0"], "--accel-mem-gib"),
    (["--model-config", "gpt-17"], "neither a preset"),
    (["--json-out", "/nonexistent-dir/plan.json"], "--json-out"),
])
def test_plan_bad_input_exits_2_with_a_message(extra, message, capsys):
    assert _plan([*BASE, *extra]) == 2
    assert message in capsys.readouterr().err


def test_plan_unparseable_number_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        _plan([*BASE, "--rate", "lots"])
    assert e.value.code == 2 and "--rate" in capsys.readouterr().err
