"""Fidelity: pdserve answers every request exactly as vLLM's own OpenAI server does, on every path.

    python -m pdserve.bench.fidelity --pdserve-url http://127.0.0.1:8000 [--pdserve-url URL ...]
        [--vllm-url URL | --config configs/cpu-pd.yaml --core 0] [--paths pd,monolithic,fallback,resume]
        [--shapes GLOB] [--bounded] [--record FILE | --expected FILE] [--json OUT]

The request shapes (bench/fidelity_shapes.py: chat and completions, streamed and not, sampling
and output options, tools, templates, bad inputs) go once to vLLM's own server, then to each
pdserve path; every answer is compared with vLLM's after masking only what must differ
(bench/fidelity_compare.py says exactly what, and why).

Without ``--vllm-url`` the command starts vLLM's server itself (bench/vllm_server.py) with the
engine settings of ``--config``, which must be the config the pdserve cluster runs, on
``--core``. ``--record FILE`` keeps vLLM's answers; ``--expected FILE`` compares with them
instead of asking vLLM again.

Paths, and how each proves the request took it:

* ``pd``: a P/D cluster (its transport, NIXL or gRPC, names the path: ``pd-nixl``,
  ``pd-grpc``); each answer must read ``x-pdserve-path: pd`` (``monolithic`` with cause
  ``several_choices`` for several choices, which P/D serves whole);
* ``monolithic``: a monolithic cluster; ``x-pdserve-path: monolithic``;
* ``fallback``: a P/D cluster with every KV link killed (the admin API's ``kill-links``, as
  ``pdserve chaos kill-links``; healed afterwards, also on failure); ``x-pdserve-path:
  fallback``, or ``pd`` for a non-streamed answer that pulled no KV (its decode engine held the
  whole prompt, so no link was used: ``pd_without_transfer``);
* ``resume``: the shapes marked ``resume`` on a P/D cluster; after the first token arrives the
  decode replica is stopped (SIGSTOP), the router's token-stream connection to it destroyed
  (``ss -K``) and the replica continued, so the router resumes the stream on another engine;
  the router's ``pdserve_stream_resumes_total{outcome="resumed"}`` must grow by one. Needs
  root, ``ss`` with socket destroy, and the cluster on this host.

The admin API needs ``--admin-key`` (or $PDSERVE_ADMIN_KEY); loopback URLs default to the
development key the shipped CPU configs carry. Exits 1 when any answer differs.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional
from urllib.parse import urlparse

import httpx

from pdserve.bench.fidelity_compare import Answer, canonical, differences, parse_sse
from pdserve.bench.fidelity_shapes import SHAPES, Shape, bounded

DEV_ADMIN_KEY = "pdserve-dev-admin"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
PATH_KINDS = ("pd", "monolithic", "fallback", "resume")
RESUMED_METRIC = 'pdserve_stream_resumes_total{outcome="resumed"}'


def send(base: str, shape: Shape, on_first_token: Optional[Callable[[httpx.Response], None]] = None) -> Answer:
    """One request, on a connection of its own (so one answer cannot leave the next a broken
    one); a stream is read to its end. ``on_first_token`` runs once, when the first event that
    carries text has arrived (the resume path cuts the stream there)."""
    t0 = time.perf_counter()
    with httpx.Client(timeout=TIMEOUT) as client:
        answer = _send(client, base, shape, on_first_token)
    answer.note["seconds"] = round(time.perf_counter() - t0, 3)
    return answer


def _send(client: httpx.Client, base: str, shape: Shape,
          on_first_token: Optional[Callable[[httpx.Response], None]]) -> Answer:
    if shape.raw is not None:
        request = client.build_request("POST", base + shape.path, content=shape.raw.encode(),
                                       headers={"content-type": shape.content_type})
    else:
        request = client.build_request("POST", base + shape.path, json=shape.body,
                                       headers={"content-type": shape.content_type})
    try:
        r = client.send(request, stream=True)
    except httpx.TransportError as e:
        return Answer(-1, {}, body={"transport_error": repr(e)})
    try:
        headers = {k.lower(): v for k, v in r.headers.items()}
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raw = r.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"raw": raw.decode(errors="replace")}
            return Answer(r.status_code, headers, body=body)
        text, called = [], on_first_token is None
        for chunk in r.iter_text():
            text.append(chunk)
            if not called and _carries_text("".join(text)):
                called = True
                on_first_token(r)
        return Answer(r.status_code, headers, events=parse_sse("".join(text)))
    except httpx.TransportError as e:  # the connection broke mid-answer
        return Answer(-1, {}, body={"transport_error": repr(e)})
    finally:
        r.close()


def _carries_text(text: str) -> bool:
    for ev in parse_sse(text.rsplit("\n\n", 1)[0] if not text.endswith("\n\n") else text):
        if isinstance(ev, dict):
            for c in ev.get("choices") or []:
                if (c.get("delta") or {}).get("content") or c.get("text"):
                    return True
    return False


@dataclass
class Mismatch:
    shape: str
    path: str
    lines: list[str]


@dataclass
class PathResult:
    path: str
    url: str
    ran: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    seconds: float = 0.0
    shape_seconds: dict[str, float] = field(default_factory=dict)
    # fallback path: answers served P/D without a KV transfer (nothing to pull: the decode
    # engine already cached the whole prompt), which a killed link cannot touch
    no_transfer: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "url": self.url, "ran": self.ran, "skipped": self.skipped,
                "no_transfer": self.no_transfer,
                "seconds": round(self.seconds, 1), "shape_seconds": self.shape_seconds,
                "mismatches": [{"shape": m.shape, "lines": m.lines} for m in self.mismatches]}


class Admin:
    """The router's admin and status API."""

    def __init__(self, client: httpx.Client, url: str, key: Optional[str]) -> None:
        self.client, self.url = client, url
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, action: str) -> None:
        r = self.client.post(f"{self.url}/admin/chaos/{action}", headers=self.headers, json={})
        if r.status_code != 200:
            raise RuntimeError(f"admin {action} at {self.url}: {r.status_code} {r.text[:200]}")

    def status(self) -> dict[str, Any]:
        r = self.client.get(self.url + "/pdserve/status")
        r.raise_for_status()
        return r.json()

    def metric(self, name: str) -> float:
        for line in self.client.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_healthy(self, timeout_s: float = 60) -> None:
        """Until every replica of every pool is healthy (a cut stream marks its replica down
        until its next load poll)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pools = self.status()["pools"]
            if all(r["healthy"] for replicas in pools.values() for r in replicas):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}: replicas not all healthy after {timeout_s:.0f}s")


def expected_path(kind: str, shape: Shape) -> Optional[str]:
    """The x-pdserve-path an answer must carry on ``kind`` (None: not checked, a refused input)."""
    if shape.bad:
        return None
    if kind == "monolithic" or shape.whole:
        return "monolithic"
    return {"pd": "pd", "fallback": "fallback", "resume": "pd"}[kind]


def pd_without_transfer(got: Answer) -> bool:
    """A P/D answer whose decode engine pulled no KV: it held the whole prompt in its own prefix
    cache (e.g. from a fallback served there), so a killed link never came into play. Only a
    non-streamed answer says so (``x-pdserve-kv-transfer``: absent, or ok with 0 bytes)."""
    if got.headers.get("x-pdserve-path") != "pd" or "x-pdserve-prefill-ms" not in got.headers:
        return False
    kv = got.headers.get("x-pdserve-kv-transfer")
    return kv is None or (kv.startswith("ok") and re.search(r"\bbytes=0\b", kv) is not None)


def compare(shape: Shape, path: str, want: Answer, got: Answer, kind: str) -> Optional[Mismatch]:
    lines = differences(canonical(want), canonical(got))
    must = expected_path(kind, shape)
    if kind == "fallback" and must == "fallback" and pd_without_transfer(got):
        must = "pd"
    if must is not None and got.status == 200 and got.headers.get("x-pdserve-path") != must:
        lines.append(f"x-pdserve-path: {got.headers.get('x-pdserve-path')!r}, not {must!r} "
                     f"(cause: {got.headers.get('x-pdserve-fallback-cause') or got.headers.get('x-pdserve-monolithic-cause')})")
    if kind == "resume" and not got.note.get("resumed"):
        lines.append(f"not resumed: {got.note}")
    return Mismatch(shape.name, path, lines) if lines else None


def skip_reason(shape: Shape, kind: str) -> Optional[str]:
    if kind == "resume":
        return shape.resume_exclusion()
    return shape.skip.get(kind)


def _sockets(*args: str) -> list[tuple[str, str, set[int]]]:
    """(local, peer, owning pids) of each TCP socket ``ss -Htnp ARGS`` lists."""
    out = subprocess.run(["ss", "-Htnp", *args], capture_output=True, text=True, timeout=10, check=True).stdout
    rows = []
    for line in out.splitlines():
        head, _, users = line.partition("users:")
        addrs = [f for f in head.split() if ":" in f]
        if len(addrs) >= 2:
            rows.append((addrs[-2], addrs[-1], {int(p) for p in re.findall(r"pid=(\d+)", users)}))
    return rows


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


class StreamCutter:
    """Cuts a P/D stream after its first token, so that the router resumes it (the resume path).

    The router's connection to the decode replica's token stream is among the TCP connections
    from the router's process to the replica's stream port (``stream_port`` in the router's
    status); every one of them is destroyed (``ss -K``): the call's, and the spare the router
    keeps open for the next call (engine/direct_stream.py). The replica is stopped meanwhile, so
    no token slips through."""

    def __init__(self, admin: Admin, router_port: int) -> None:
        self.admin = admin
        self.router_port = router_port
        self.router_pids: set[int] = set()

    def arm(self) -> None:
        """Before the request: the router's process."""
        self.router_pids = set().union(*(pids for local, _, pids in _sockets("-l") if _port(local) == self.router_port))
        if not self.router_pids:
            raise RuntimeError(f"no process of this host listens on the router's port {self.router_port}")

    def cut(self, response: httpx.Response) -> dict[str, Any]:
        replica_id = response.headers.get("x-pdserve-decode-replica")
        replicas = {r["replica"]: r for r in self.admin.status()["pools"]["decode"]}
        if replica_id not in replicas:
            raise RuntimeError(f"decode replica {replica_id!r} is not in the pool: {sorted(replicas)}")
        pid, port = replicas[replica_id]["pid"], replicas[replica_id].get("stream_port")
        if not port:
            raise RuntimeError(f"decode replica {replica_id} reports no direct stream port")
        os.kill(pid, signal.SIGSTOP)  # no more tokens while the connection is destroyed
        try:
            conns = [(local, peer) for local, peer, pids in _sockets("state", "established")
                   if pids & self.router_pids and _port(peer) == port]
            for local, peer in conns:
                subprocess.run(["ss", "-K", "src", local, "dst", peer], capture_output=True, timeout=10, check=True)
        finally:
            os.kill(pid, signal.SIGCONT)
        if not conns:
            raise RuntimeError(f"no connection from the router to decode replica {replica_id}'s stream port")
        return {"replica": replica_id, "cut": len(conns)}


class Runner:
    def __init__(self, expected: dict[str, Answer], shapes: list[Shape], admin_key: Optional[str],
                 log: Callable[[str], None] = print) -> None:
        self.expected = expected
        self.shapes = shapes
        self.admin_key = admin_key
        self.log = log

    def run_path(self, kind: str, url: str, label: Optional[str] = None) -> PathResult:
        label = label or kind
        result = PathResult(label, url)
        t0 = time.perf_counter()
        with httpx.Client(timeout=TIMEOUT) as client:
            admin = Admin(client, url, self.admin_key)
            if kind in ("pd", "resume"):
                wait_for_pd(url)  # an earlier fault's open link breaker sends requests to fallback for a while
            if kind == "fallback":
                admin.post("kill-links")
            try:
                for shape in self.shapes:
                    why = skip_reason(shape, kind)
                    if why is not None:
                        result.skipped[shape.name] = why
                        continue
                    got = self._one(admin, kind, url, shape)
                    result.ran += 1
                    result.shape_seconds[shape.name] = got.note.get("seconds", 0.0)
                    if kind == "fallback" and pd_without_transfer(got):
                        result.no_transfer.append(shape.name)
                    bad = compare(shape, label, self.expected[shape.name], got, kind)
                    if bad is not None:
                        result.mismatches.append(bad)
                        self.log(f"  MISMATCH {label} {shape.name}:\n    " + "\n    ".join(bad.lines))
            finally:
                if kind == "fallback":
                    admin.post("heal-links")
                    wait_for_pd(url)
        result.seconds = time.perf_counter() - t0
        return result

    def _one(self, admin: Admin, kind: str, url: str, shape: Shape) -> Answer:
        if kind != "resume":
            return send(url, shape)
        cutter = StreamCutter(admin, urlparse(url).port or 80)
        got = None
        for _ in range(3):  # a stream that ended before the cut was not resumed: try again
            admin.wait_healthy()
            cutter.arm()
            before = admin.metric(RESUMED_METRIC)
            seen: dict[str, Any] = {}
            got = send(url, shape, on_first_token=lambda r: seen.update(cutter.cut(r)))
            got.note.update(seen, resumed=admin.metric(RESUMED_METRIC) - before == 1)
            if got.note["resumed"]:
                break
        admin.wait_healthy()
        return got


PROBE = {"model": None, "prompt": [712, 512, 300], "max_tokens": 1, "temperature": 0}


def wait_for_pd(url: str, timeout_s: float = 120) -> None:
    """Until a one-token request is served P/D (after a fault, a link's breaker stays open a while)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=TIMEOUT) as client:
        model = client.get(url + "/v1/models").json()["data"][0]["id"]
        while time.monotonic() < deadline:
            r = client.post(url + "/v1/completions", json=dict(PROBE, model=model))
            if r.status_code == 200 and r.headers.get("x-pdserve-path") == "pd":
                return
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not serve P/D again within {timeout_s:.0f}s")


def record(url: str, shapes: Iterable[Shape]) -> dict[str, Answer]:
    return {s.name: send(url, s) for s in shapes}


@dataclass
class Target:
    kind: str  # one of PATH_KINDS
    label: str  # pd-nixl, pd-grpc, monolithic, fallback-grpc, ...
    url: str


def targets_for(url: str, kinds: Iterable[str], status: dict[str, Any]) -> list[Target]:
    """The paths a pdserve cluster can be tested on: P/D clusters pd, fallback and resume;
    monolithic clusters monolithic."""
    kinds = list(kinds)
    if status.get("mode") == "monolithic":
        return [Target("monolithic", "monolithic", url)] if "monolithic" in kinds else []
    transport = status.get("transport") or "pd"
    return [Target(k, f"{k}-{transport}", url) for k in ("pd", "fallback", "resume") if k in kinds]


def select(shapes: list[Shape], patterns: Optional[str]) -> list[Shape]:
    if not patterns:
        return shapes
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    return [s for s in shapes if any(fnmatch.fnmatch(s.name, g) for g in globs)]


def summary(results: list[PathResult], shapes: list[Shape]) -> str:
    lines = [f"{len(shapes)} shapes ({sum(s.endpoint == 'chat' for s in shapes)} chat, "
             f"{sum(s.endpoint == 'completions' for s in shapes)} completions; "
             f"{sum(s.stream for s in shapes)} streamed; {sum(s.bad for s in shapes)} bad inputs)"]
    for r in results:
        slowest = ", ".join(f"{n} {t:.1f} s" for n, t in sorted(r.shape_seconds.items(), key=lambda kv: -kv[1])[:3])
        pd_ok = f"; {len(r.no_transfer)} served P/D with nothing to pull" if r.no_transfer else ""
        lines.append(f"  {r.path:16s} {r.ran:4d} run, {len(r.skipped):3d} skipped, {len(r.mismatches):3d} differ "
                     f"({r.seconds:.1f} s; slowest: {slowest}{pd_ok})")
    return "\n".join(lines)


def _admin_key(args) -> Optional[str]:
    return args.admin_key or os.environ.get("PDSERVE_ADMIN_KEY") or DEV_ADMIN_KEY


def _vllm_answers(args, shapes: list[Shape]) -> dict[str, Answer]:
    if args.expected:
        saved = json.loads(Path(args.expected).read_text())
        return {name: Answer.from_json(a) for name, a in saved.items()}
    if args.vllm_url:
        answers = record(args.vllm_url, shapes)
    else:
        from pdserve.bench.vllm_server import VllmServer
        from pdserve.settings.cluster import load_config

        print(f"starting vLLM's server ({args.config}, core {args.core}) ...", flush=True)
        with VllmServer(load_config(args.config), core=args.core, log_path=args.vllm_log) as server:
            answers = record(server.url, shapes)
    if args.record:
        Path(args.record).write_text(json.dumps({k: a.to_json() for k, a in answers.items()}, indent=1))
    return answers


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pdserve-url", action="append", default=[], help="a pdserve router (repeat for several)")
    p.add_argument("--vllm-url", help="vLLM's own server, already running with the same engine settings")
    p.add_argument("--config", default="configs/cpu-pd.yaml", help="the pdserve cluster's config (for vLLM's server)")
    p.add_argument("--core", type=int, default=0, help="the core vLLM's server runs its engine on")
    p.add_argument("--vllm-log", default=None, help="where vLLM's server writes its log")
    p.add_argument("--paths", default=",".join(PATH_KINDS), help=f"any of {', '.join(PATH_KINDS)}")
    p.add_argument("--shapes", default=None, help="comma-separated globs of shape names (default: all)")
    p.add_argument("--bounded", action="store_true", help="only the bounded set make test runs")
    p.add_argument("--record", help="write vLLM's answers here")
    p.add_argument("--expected", help="compare with vLLM's answers recorded here instead of asking vLLM")
    p.add_argument("--admin-key", default=None)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.paths.split(",") if k.strip()]
    unknown = set(kinds) - set(PATH_KINDS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}; the paths are {', '.join(PATH_KINDS)}")
    shapes = select(bounded() if args.bounded else SHAPES, args.shapes)
    t0 = time.perf_counter()
    expected = _vllm_answers(args, shapes)
    slowest = sorted(expected.items(), key=lambda kv: -kv[1].note.get("seconds", 0))[:3]
    print(f"vLLM's answers: {len(expected)} shapes in {time.perf_counter() - t0:.1f} s (slowest: "
          + ", ".join(f"{n} {a.note.get('seconds', 0):.1f} s" for n, a in slowest) + ")", flush=True)
    runner = Runner(expected, [s for s in shapes if s.name in expected], _admin_key(args))
    results = []
    for url in args.pdserve_url:
        with httpx.Client(timeout=TIMEOUT) as c:
            status = Admin(c, url, None).status()
        for target in targets_for(url, kinds, status):
            print(f"{target.label} at {url} ...", flush=True)
            results.append(runner.run_path(target.kind, target.url, target.label))
    print(summary(results, runner.shapes))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1))
    return 1 if any(r.mismatches for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
