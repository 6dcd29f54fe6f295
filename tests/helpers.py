"""Small HTTP helpers shared by the cluster tests."""
from __future__ import annotations

import json
import time
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def chat_body(content: str, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    body.update(extra)
    return body


def post(url: str, path: str, body: Any = None, raw: bytes | None = None, headers=None) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as c:
        if raw is not None:
            return c.post(url + path, content=raw, headers=headers or {"content-type": "application/json"})
        return c.post(url + path, json=body, headers=headers)


def status(url: str) -> dict[str, Any]:
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.get(url + "/pdserve/status")
        r.raise_for_status()
        return r.json()


def metric_samples(url: str) -> dict[str, float]:
    """The router's /metrics as {'name{labels}': value}, labels as the exposition writes them."""
    with httpx.Client(timeout=TIMEOUT) as c:
        text = c.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def pool_totals(url: str, pool: str, key: str) -> float:
    return sum(r[key] or 0 for r in status(url)["pools"][pool])


def stream_chat(url: str, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """Stream a chat completion; return the response and the parsed SSE chunks."""
    chunks = []
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    chunks.append({"done": True})
                    break
                chunks.append(json.loads(data))
    return r, chunks


def engine_call(app: str, deployment: str, body: dict[str, Any], endpoint: str = "chat") -> list[tuple]:
    """Call one engine deployment of a running app directly (no router); return its items."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app).options(stream=True)
    return [item for batch in handle.generate.remote(endpoint, body) for item in batch]


def set_kv_faults(app: str, deployment: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).set_kv_faults.remote(spec).result()


def expected_kv_mode() -> str:
    """The mode the gRPC transport should pick between two sibling engine processes here.

    Same-host references need the call itself (no seccomp filter refusing it) and the kernel to
    let one process read a sibling's memory: no Yama, or ptrace_scope 0, or CAP_SYS_PTRACE under
    scope 1-2 (scope 3 forbids it). Anywhere else the bytes travel inline.
    """
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except OSError:
        scope = 0
    cap_sys_ptrace = False
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                cap_sys_ptrace = bool(int(line.split()[1], 16) >> 19 & 1)
    from pdserve.kv_transfer import same_host

    allowed = scope == 0 or (scope in (1, 2) and cap_sys_ptrace)
    return "same-host" if allowed and same_host.supported() else "inline"


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 1.0) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``timeout_s``."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def vllm_counter(app: str, deployment: str, name: str) -> float:
    """vLLM's own Prometheus counter ``name`` (e.g. ``vllm:generation_tokens_total``), summed
    over the replicas of one engine deployment: read from the registry of each replica's
    process (vLLM's PrometheusStatLogger records there), through Ray's ``__ray_call__``."""
    import ray

    def read(_replica, metric):
        from prometheus_client import REGISTRY

        return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == metric)

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    assert actors, f"no replica actor named {prefix}*"
    return sum(ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(read, name), timeout=30)
               for n in actors)
