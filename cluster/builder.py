"""Turns a ClusterConfig into one Ray Serve application graph.

The builder only wires deployments together; the servers it wires live in prefill/,
decode/ and router/ and know nothing of it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from pdserve.cluster.autoscaling import autoscaling_config
from pdserve.decode.deployment import DecodeServer, MonolithicServer
from pdserve.engine.config import PoolSpec
from pdserve.prefill.deployment import PrefillServer
from pdserve.router.app import RouterServer
from pdserve.router.targeting import TargetedRequestRouter
from pdserve.settings.cluster import ClusterConfig, load_config

_SERVERS = {"prefill": PrefillServer, "decode": DecodeServer, "monolithic": MonolithicServer}


def _actor_options(cfg: ClusterConfig, pool: PoolSpec) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if cfg.device == "cpu":
        # Logical CPUs make Ray place replicas where cores are free; the real
        # isolation is the core binding each replica applies to itself.
        opts["num_cpus"] = len(pool.cores_for(0))
    else:
        opts["num_cpus"] = 1
        opts["num_gpus"] = pool.gpus_per_replica * pool.tensor_parallel_size
    if pool.ray_resources:
        opts["resources"] = dict(pool.ray_resources)
    return opts


def _engine_deployment(cfg: ClusterConfig, name: str, pool: PoolSpec, config_dict: dict):
    scaling = ({"autoscaling_config": autoscaling_config(pool)} if pool.autoscaling
               else {"num_replicas": pool.replicas})
    return serve.deployment(
        _SERVERS[name],
        name=name,
        **scaling,
        max_ongoing_requests=pool.max_ongoing_requests,
        ray_actor_options=_actor_options(cfg, pool),
        request_router_config=RequestRouterConfig(request_router_class=TargetedRequestRouter),
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
    ).bind(config_dict)


def router_deployment_options(cfg: ClusterConfig) -> dict[str, Any]:
    """The router deployment's options (also used by the router-capacity benchmark)."""
    # No CPU: the router must never wait for cores the engines hold. Its custom resources
    # (router.ray_resources) pin it to the node whose port, probes and Service expect it.
    actor: dict[str, Any] = {"num_cpus": 0}
    if cfg.router.ray_resources:
        actor["resources"] = dict(cfg.router.ray_resources)
    return {"name": "router", "num_replicas": 1, "max_ongoing_requests": 10_000, "ray_actor_options": actor}


def build_app(cfg: ClusterConfig):
    config_dict = cfg.model_dump(mode="json")
    engines = {name: _engine_deployment(cfg, name, pool, config_dict) for name, pool in cfg.pools().items()}
    return serve.deployment(RouterServer, **router_deployment_options(cfg)).bind(config_dict, **engines)


_BUILDER_ARGS = ("config", "port")


def app_builder(args: dict):
    """Application builder for a Ray Serve config file (serveConfigV2 on KubeRay)::

        applications:
          - name: pdserve
            import_path: pdserve.cluster.builder:app_builder
            route_prefix: null
            args: {config: /etc/pdserve/gpu-pd.yaml, port: 8000}

    ``config`` (required) is the path of a pdserve config file on the node that builds the
    application; ``port`` (optional) overrides router.port. Ray Serve calls this with the
    ``args`` mapping as it is (the parameter is a plain dict, not a pydantic model).
    """
    if not isinstance(args, Mapping):
        raise TypeError(f"pdserve app_builder: args must be a mapping like {{'config': '/path/to/config.yaml'}}, "
                        f"got {type(args).__name__}")
    unknown = sorted(set(args) - set(_BUILDER_ARGS))
    if unknown:
        raise ValueError(f"pdserve app_builder: unknown args {unknown}; it takes {list(_BUILDER_ARGS)}")
    if "config" not in args:
        raise ValueError("pdserve app_builder: args must name the pdserve config file, e.g. "
                         "args: {config: /etc/pdserve/gpu-pd.yaml}")
    path = args["config"]
    if not isinstance(path, str) or not path:
        raise ValueError(f"pdserve app_builder: args.config must be a file path, got {path!r}")
    cfg = load_config(path)
    if args.get("port") is not None:
        port = args["port"]
        if isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"pdserve app_builder: port must be an integer, got {port!r}")
        data = cfg.model_dump()
        data["router"]["port"] = port
        cfg = ClusterConfig.model_validate(data)  # range-checked like router.port in the file
    return build_app(cfg)


def cpus_needed(cfg: ClusterConfig) -> int:
    if cfg.device != "cpu":
        return 0
    return sum(len(p.cores_for(i)) for p in cfg.pools().values() for i in range(p.max_replicas))
