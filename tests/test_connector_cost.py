"""The connector-cost benchmark's arms and arithmetic, without engines (bench/connector_cost.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench import connector_cost
from pdserve.bench.connector_cost import kv_transfer_config, summarize, with_connector
from pdserve.bench.serving_cost import FIGURES
from pdserve.bench.vllm_server import server_command
from pdserve.settings.cluster import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_each_arm_gives_vllms_server_its_connector():
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    assert kv_transfer_config("none", cfg) is None
    assert kv_transfer_config("vllm-nixl", cfg)["kv_connector"] == "NixlConnector"
    ours = kv_transfer_config("pdserve", cfg)
    # the connector a P/D engine of this config gets: pdserve's NIXL connector, with its progress-thread fix
    assert ours["kv_connector"] == "FaultableNixlConnector" and ours["kv_role"] == "kv_both"
    assert ours["kv_connector_module_path"] == "pdserve.kv_transfer.nixl_faults"
    grpc = kv_transfer_config("pdserve", load_config(CONFIGS / "cpu-pd-grpc.yaml"))
    assert grpc["kv_connector"] == "GrpcKVConnector"
    with pytest.raises(ValueError, match="unknown arm"):
        kv_transfer_config("lmcache", cfg)


def test_the_connector_reaches_vllms_command_line_and_only_there():
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    cmd = server_command(with_connector(cfg, "pdserve"), port=8123)
    assert "FaultableNixlConnector" in cmd[cmd.index("--kv-transfer-config") + 1]
    assert "--kv-transfer-config" not in server_command(with_connector(cfg, "none"), port=8123)
    assert "kv_transfer_config" not in cfg.engine.engine_kwargs  # the loaded config is left as it was


def test_the_events_arms_publish_kv_events_as_an_engine_replica_does():
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    events = server_command(with_connector(cfg, "events"), port=8123)
    both = server_command(with_connector(cfg, "pdserve-events"), port=8123)
    assert "--kv-transfer-config" not in events and "--kv-transfer-config" in both
    for cmd in (events, both):
        published = json.loads(cmd[cmd.index("--kv-events-config") + 1])
        assert published["enable_kv_cache_events"] and published["publisher"] == "zmq"
    assert "--kv-events-config" not in server_command(with_connector(cfg, "pdserve"), port=8123)


def test_ratios_are_each_arms_medians_over_no_connectors():
    run = lambda x: {k: x for k in FIGURES}  # noqa: E731
    report = summarize({"none": [run(4.0), run(6.0)], "vllm-nixl": [run(9.0), run(11.0)], "pdserve": [run(5.0)]})
    assert report["medians"]["none"]["median_tpot_ms"] == 5.0
    assert report["ratios_to_none"]["vllm-nixl"]["median_tpot_ms"] == 2.0
    assert report["ratios_to_none"]["pdserve"]["p99_itl_ms"] == 1.0
    assert summarize({"pdserve": [run(5.0)]})["ratios_to_none"] == {}


@pytest.mark.parametrize("argv, msg", [
    (["--arms", "none,turbo"], "--arms: each of none,vllm-nixl,pdserve"),
    (["--rounds", "0"], "--rounds and --num-prompts"),
    (["--config", str(CONFIGS / "cpu-monolithic.yaml")], "is not a P/D config"),
])
def test_bad_arguments_are_named(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        connector_cost.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
