"""Every address a replica advertises is routable (engine/server.py advertised_address).

The direct-stream address in the load report, the NIXL side channel host and the gRPC KV
endpoint are dialled from other hosts. The old ``node_ip()`` fell back to 127.0.0.1, which
on a multi-node cluster sends every peer to itself. Ray functions are monkeypatched: no Ray.
"""
from __future__ import annotations

import os

import pytest
import ray

from pdserve.bench.router_capacity import stub_cluster_config
from pdserve.engine.server import EngineServer, advertised_address


def _ray(monkeypatch, ip, alive_nodes: int = 1, initialized: bool = True, dead_nodes: int = 0):
    monkeypatch.setattr(ray, "is_initialized", lambda: initialized)
    if isinstance(ip, Exception):
        def node_ip():
            raise ip
    else:
        def node_ip():
            return ip
    monkeypatch.setattr(ray.util, "get_node_ip_address", node_ip)
    nodes = [{"Alive": True}] * alive_nodes + [{"Alive": False}] * dead_nodes
    monkeypatch.setattr(ray, "nodes", lambda: nodes)


def test_the_node_ip_of_a_multi_node_cluster_is_advertised(monkeypatch):
    _ray(monkeypatch, "10.0.3.7", alive_nodes=3)
    assert advertised_address() == "10.0.3.7"


def test_a_single_node_cluster_on_loopback_keeps_working(monkeypatch):
    _ray(monkeypatch, "127.0.0.1", alive_nodes=1, dead_nodes=2)  # dead nodes do not count
    assert advertised_address() == "127.0.0.1"


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.1.1", "::1"])
def test_loopback_on_a_multi_node_cluster_fails_startup_with_the_fix(monkeypatch, ip):
    _ray(monkeypatch, ip, alive_nodes=2)
    with pytest.raises(RuntimeError, match="no routable address") as e:
        advertised_address()
    assert "--node-ip-address" in str(e.value) and "2 nodes" in str(e.value)


def test_no_ray_node_ip_fails_startup(monkeypatch):
    _ray(monkeypatch, RuntimeError("GCS unreachable"))
    with pytest.raises(RuntimeError, match="no routable address.*GCS unreachable"):
        advertised_address()
    _ray(monkeypatch, "")
    with pytest.raises(RuntimeError, match="no routable address"):
        advertised_address()


def test_without_ray_there_is_no_address_to_advertise(monkeypatch):
    _ray(monkeypatch, "10.0.0.1", initialized=False)
    with pytest.raises(RuntimeError, match="no routable address.*not initialized"):
        advertised_address()


def test_the_engine_advertises_its_host_to_kv_peers(monkeypatch):
    cfg = stub_cluster_config("pd", stub_replicas=1)
    cfg = cfg.model_copy(update={"kv_transfer": cfg.kv_transfer.model_copy(update={"transport": "grpc"})})
    server = EngineServer(cfg, "prefill", 0, host="10.0.3.7")
    # _set_env writes the engine's environment: into a copy, so nothing leaks into later tests
    env = {k: v for k, v in os.environ.items() if k != "VLLM_NIXL_SIDE_CHANNEL_HOST"}
    monkeypatch.setattr(os, "environ", env)
    server._set_env()
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.3.7"
    from pdserve.kv_transfer.registry import kv_transfer_config_for

    # what _engine_args hands the gRPC connector (the endpoint decode engines dial)
    kv = kv_transfer_config_for(cfg, "prefill", port=server.kv_port, host=server.host, fault_file=server.fault_file)
    assert kv["kv_connector_extra_config"]["pdserve_grpc"]["host"] == "10.0.3.7"
