"""One real cluster per test session, shared by every test marked ``cluster``.

It is one local Ray cluster with four Ray Serve applications built from the shipped configs,
each router on its own port: the P/D app from configs/cpu-pd.yaml (NIXL), the P/D app from
configs/cpu-pd-grpc.yaml (our gRPC KV stream, with a short lease, deadline and prefill timeout
so the failure tests run quickly), a one-replica monolithic app (configs/cpu-monolithic.yaml,
shrunk to one engine), and the P/D app from configs/cpu-pd-tenants.yaml (auth, admission and
the degradation ladder on; one extra test-only tenant that may not use the served model). The
P/D apps send every request P/D (``every_request_pd``). All load the built-in tiny model with
the same seeded dummy weights, so greedy outputs must agree. The three apps of the shipped
configs run vLLM's serving layer with a tool-call parser (``TOOL_CALL_PARSER``), as the fidelity
test needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pdserve.bench.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@dataclass
class Clusters:
    base: str  # http://127.0.0.1:PORT
    pd_cfg: object
    mono_cfg: object

    mono_base: str = ""
    grpc_base: str = ""
    grpc_cfg: object = None
    tenants_base: str = ""
    tenants_cfg: object = None

    @property
    def pd_url(self) -> str:
        return self.base

    @property
    def mono_url(self) -> str:
        return self.mono_base

    @property
    def grpc_url(self) -> str:
        return self.grpc_base


@pytest.fixture(scope="session")
def clusters():
    from pdserve.cluster import runtime
    from pdserve.engine.config import AutoscalingSpec
    from pdserve.settings.cluster import load_config

    pd_cfg = every_request_pd(with_tool_call_parser(load_config(CONFIGS / "cpu-pd.yaml")))
    mono_cfg = with_tool_call_parser(load_config(CONFIGS / "cpu-monolithic.yaml"))
    grpc_cfg = every_request_pd(with_tool_call_parser(load_config(CONFIGS / "cpu-pd-grpc.yaml")))
    pd_port, mono_port, grpc_port = free_port(), free_port(), free_port()
    pd_cfg = pd_cfg.model_copy(update={"router": pd_cfg.router.model_copy(update={"port": pd_port})})
    mono_cfg = mono_cfg.model_copy(update={
        "name": "mono",
        # One replica, which Little's-Law autoscaling may take to two (the cores bound it).
        "monolithic": mono_cfg.monolithic.model_copy(update={
            "replicas": 1, "cpu_cores": ["0", "1"], "autoscaling": AutoscalingSpec(**MONO_AUTOSCALING)}),
        "router": mono_cfg.router.model_copy(update={"port": mono_port}),
    })
    kv = grpc_cfg.kv_transfer
    grpc_cfg = grpc_cfg.model_copy(update={
        "name": "pdgrpc",
        # 10 s, not the default 30: the prefill-timeout test waits this long for its answer; still
        # well past the two 2 s load-poll timeouts that give up a silent replica first
        "router": grpc_cfg.router.model_copy(update={"port": grpc_port, "prefill_timeout_s": 10.0}),
        "kv_transfer": kv.model_copy(update={
            "side_channel_base_port": kv.side_channel_base_port + 300,
            "lease_seconds": 4,
            "grpc": kv.grpc.model_copy(update={"deadline_s": 3.0}),
        }),
    })
    tenants_cfg = tenants_config(every_request_pd(load_config(CONFIGS / "cpu-pd-tenants.yaml")), free_port())
    # Ray counts logical CPUs; the apps share the two cores by design (tests run one at a time).
    runtime.start_ray(num_cpus=7)
    runtime.start_serve()
    runtime.deploy(pd_cfg, app_name="pd")
    runtime.deploy(mono_cfg, app_name="mono")
    runtime.deploy(grpc_cfg, app_name="pdgrpc")
    runtime.deploy(tenants_cfg, app_name="tenants")
    base, mono_base = f"http://127.0.0.1:{pd_port}", f"http://127.0.0.1:{mono_port}"
    grpc_base = f"http://127.0.0.1:{grpc_port}"
    tenants_base = f"http://127.0.0.1:{tenants_cfg.router.port}"
    try:
        for url in (base, mono_base, grpc_base, tenants_base):
            runtime.wait_ready(url, timeout_s=900)
        yield Clusters(base, pd_cfg, mono_cfg, mono_base, grpc_base, grpc_cfg, tenants_base, tenants_cfg)
    finally:
        runtime.stop_cluster()


# vLLM serves tools with tool_choice "auto" only with a tool-call parser: the apps the fidelity
# test (tests/test_fidelity.py) compares with vLLM's own server have one, as that server does.
# "pythonic" reads any tokenizer's text (the tiny model has no tool-call tokens).
TOOL_CALL_PARSER = "pythonic"


def every_request_pd(cfg):
    """The shipped P/D configs decide per request whether to split it (router.disaggregation
    adaptive), and an idle cluster serves most requests whole. The cluster tests drive the P/D
    path itself (KV transfer, its faults, fallback, resume), so their apps split every request;
    the decider has its own tests (test_decider.py, test_cache_aware_routing.py)."""
    return cfg.model_copy(update={"router": cfg.router.model_copy(update={"disaggregation": "always"})})


def with_tool_call_parser(cfg):
    return cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"tool_call_parser": TOOL_CALL_PARSER})})


RESTRICTED_KEY = "test-restricted-key"
STANDARD_E2E_SLO_MS = 1500.0
# c_knee 3 (2.25 usable): the autoscaling test's 6 streams scale the pool up; the 2 streams of
# the bench-agreement test do not (a replica starting mid-measurement would skew it).
MONO_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "c_knee": 3.0, "safety": 0.75, "window_s": 4.0,
                    "upscale_cooldown_s": 0.0, "downscale_cooldown_s": 6.0}


def tenants_config(cfg, port: int):
    """The shipped tenants config on its own port, plus a tenant that may not use the served model."""
    from pdserve.admission.tenants import hash_key
    from pdserve.admission.config import TenantSpec
    from pdserve.router.config import ClassSLO

    restricted = TenantSpec(name="restricted", models=["some-other-model"], key_sha256=[hash_key(RESTRICTED_KEY)])
    # An end-to-end SLO on Standard that the metrics test controls by request length.
    classes = dict(cfg.slo.classes, standard=ClassSLO(ttft_ms=2000, tpot_ms=100, e2e_ms=STANDARD_E2E_SLO_MS))
    return cfg.model_copy(update={
        "router": cfg.router.model_copy(update={"port": port}),
        "auth": cfg.auth.model_copy(update={"tenants": [*cfg.auth.tenants, restricted]}),
        "slo": cfg.slo.model_copy(update={"classes": classes}),
    })


def pytest_collection_modifyitems(config, items):
    # Cluster tests last, so a broken cluster start never hides the unit-test results.
    items.sort(key=lambda it: 1 if it.get_closest_marker("cluster") else 0)
