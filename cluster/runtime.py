"""Start Ray (or join one), deploy configs as Ray Serve applications, tear down."""
from __future__ import annotations

import os
import time
import urllib.request
from typing import Any, Optional

from pdserve.settings.cluster import ClusterConfig


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from pdserve.lab.ray_internals import use_in_this_process

        use_in_this_process()  # Ray's workers (router, replicas, engines) at nice 0, not 15
        ray.init(num_cpus=max(os.cpu_count() or 1, num_cpus or 0), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


def start_serve() -> None:
    from ray import serve

    # The router replicas serve HTTP themselves, so Ray Serve starts no HTTP proxy.
    serve.start(http_options={"location": "NoServer"})


def deploy(cfg: ClusterConfig, app_name: Optional[str] = None) -> None:
    from ray import serve

    from pdserve.cluster.builder import build_app

    serve.run(build_app(cfg), name=app_name or cfg.name, route_prefix=None, blocking=False)


def wait_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(1)
    raise TimeoutError(f"cluster did not become healthy at {url} within {timeout_s:.0f}s (last: {last!r})")


def start_cluster(cfg: ClusterConfig, port: Optional[int] = None, address: Optional[str] = None,
                  host: Optional[str] = None) -> str:
    """Start (or join) Ray, deploy ``cfg``, wait until healthy; return the base URL."""
    from pdserve.cluster.builder import cpus_needed

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v}
    if overrides:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update=overrides)})
    host, port = cfg.router.host, cfg.router.port
    start_ray(address, cpus_needed(cfg))
    start_serve()
    deploy(cfg)
    url = f"http://{host}:{port}"
    wait_ready(url)
    return url


def router_deployment_options(cfg: ClusterConfig) -> dict[str, Any]:
    """The router deployment's options (builder.py), for the router-capacity benchmark, which
    gets this module handed in (bench/cluster_runtime.py) rather than importing cluster/."""
    from pdserve.cluster.builder import router_deployment_options as options

    return options(cfg)


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
