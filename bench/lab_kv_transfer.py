"""Benchmark: KV transfer ACROSS lab hosts, NIXL vs inline gRPC, beside the raw TCP limit.

    sudo python -m pdserve.bench.lab_kv_transfer [--words 50,200,800,1600] [--repeats 5]
        [--rate 10gbit] [--delay 1ms] [--conditions none,rate,delay] [--keep]

Takes about 15 minutes on the 2-core box with a lab already up, about 17 when it makes the
lab (an estimate, not yet measured: two deploys of two tiny-wide engines each, then
3 conditions x 2 transports x 4 lengths x 6 requests, and 3 x 5 TCP streams of 256 MiB).

It uses the lab that is up (``pdserve lab``) or makes one from the NIXL config's ``lab`` section
and removes it at the end. It deploys two apps beside whatever the lab serves: configs/cpu-lab-pd.yaml
(NIXL, UCX over TCP) and configs/cpu-lab-pd-grpc.yaml (gRPC, bytes inline) with the model switched to
builtin:tiny-wide (32 KiB of KV per token). Their engines need one free core-slot on the prefill
and on the decode host each; it checks that before deploying. At the end it deletes them
(``--keep`` keeps the apps, and a lab it made).

For each condition on the prefill <-> decode path (none; ``LinkFault(rate=...)``;
``LinkFault(delay_ms=...)``), applied and cleared in turn, it measures:
1. the raw TCP limit: one plain Python socket stream from the prefill host to the decode host
   (4 MiB sends), timed by the receiver from accept to end of stream; median of repeats;
2. per transport and prompt length: prompts one at a time, each with a fresh random prefix (no
   prefix-cache hit), the first of each length a warm-up; each pull's bytes and seconds are the
   delta of the decode replica's transfer counters. The two transports time different things:
   NIXL's seconds are the READ alone, gRPC's the whole pull (request, stream, CRC-32C checks,
   copy into the KV cache). ``client ms`` is the whole non-streamed request (2 output tokens),
   which both share.

The goal printed beside the figures: inline gRPC at least 0.8x NIXL and at least 0.5x raw TCP,
same run. Nothing asserts on speed. The table goes to stdout, the figures as JSON to
bench/results/lab_kv_transfer-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
CLIENT = "python -m pdserve.bench.lab_kv_transfer"
MiB = 1 << 20
MODEL = "tiny-wide"
MAX_MODEL_LEN = 4096  # tiny-wide's max_position_embeddings
# transport -> (lab config, app name, router port, side-channel base port)
APPS = {
    "nixl": ("cpu-lab-pd.yaml", "pdlab-bench-nixl", 8100, 17600),
    "grpc": ("cpu-lab-pd-grpc.yaml", "pdlab-bench-grpc", 8101, 18600),
}
GOAL_VS_NIXL, GOAL_VS_TCP = 0.8, 0.5
TIMES = {"nixl": "NIXL READ alone", "grpc": "whole gRPC pull"}


# ------------------------------------------------------------------ pure helpers

def parse_kv_header(value: Optional[str]) -> Optional[dict[str, Any]]:
    """``ok; ms=1.5; bytes=10; mode=inline`` -> {"status": "ok", "ms": 1.5, "bytes": 10, "mode": "inline"}."""
    if not value:
        return None
    status, *fields = [part.strip() for part in value.split(";")]
    out: dict[str, Any] = {"status": status}
    for field in fields:
        key, _, val = field.partition("=")
        out[key] = {"ms": float, "bytes": int}.get(key, str)(val)
    return out


def parse_delay_ms(text: str) -> float:
    """``1ms`` or ``1`` -> 1.0 (milliseconds)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms)?\s*", text)
    if not m:
        raise ValueError(f"delay {text!r}: give milliseconds, e.g. 1ms or 0.5")
    return float(m.group(1))


def median(values: Iterable[float]) -> Optional[float]:
    vals = list(values)
    return statistics.median(vals) if vals else None


def bench_config(raw: dict, *, name: str, port: int, side_channel_base_port: int) -> dict:
    """A lab config as loaded from YAML, made into a benchmark app: tiny-wide, its own name and ports."""
    cfg = json.loads(json.dumps(raw))  # a deep copy of plain YAML data
    cfg["name"] = name
    cfg["model"] = {**cfg.get("model", {}), "path": f"builtin:{MODEL}", "max_model_len": MAX_MODEL_LEN}
    # one prefill step per prompt, as bench/kv_transfer.py
    cfg["engine"] = {**cfg.get("engine", {}), "max_num_batched_tokens": MAX_MODEL_LEN}
    # every request across the link being measured, whatever the shipped config decides
    cfg["router"] = {**cfg.get("router", {}), "port": port, "disaggregation": "always"}
    cfg["kv_transfer"] = {**cfg.get("kv_transfer", {}), "side_channel_base_port": side_channel_base_port}
    return cfg


def host_of_pool(cfg, pool: str) -> str:
    """The lab host whose Ray resources the pool asks for (a validated ClusterConfig with a lab)."""
    wanted = set(cfg.pools()[pool].ray_resources)
    hosts = [h.name for h in cfg.lab.hosts if wanted and wanted <= set(h.resources)]
    if len(hosts) != 1:
        raise ValueError(f"the {pool} pool's ray_resources {sorted(wanted)} name {len(hosts)} lab hosts, not one")
    return hosts[0]


def resource_needs(cfg) -> list[dict[str, float]]:
    """What each replica of a validated CPU ClusterConfig asks Ray for (as cluster/builder.py places them)."""
    needs = [{"CPU": float(len(pool.cores_for(0))), **pool.ray_resources}
             for pool in cfg.pools().values() for _ in range(pool.max_replicas)]
    return needs + [dict(cfg.router.ray_resources)]


def unplaceable(free: list[dict[str, float]], needs: list[dict[str, float]]) -> list[dict[str, float]]:
    """The needs that find no node with room, placing each on the first node that has it."""
    free = [dict(node) for node in free]
    missing = []
    for need in needs:
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in need.items())), None)
        if node is None:
            missing.append(need)
            continue
        for k, v in need.items():
            node[k] -= v
    return missing


def summarize(transport: str, condition: str, words: int, samples: list[dict]) -> dict[str, Any]:
    """One table row from the measured (non-warm-up) requests of one transport, condition and length.

    A sample counts when it took the P/D path and its pull succeeded: its figures are the counter
    deltas (requests go one at a time, so the deltas are its own; NIXL may count several transfers
    for one request, whose seconds add up), or the response header's when the counters did not move
    in time."""
    good, failed, not_inline = [], 0, []
    for s in samples:
        head = s.get("header") or {}
        if transport == "grpc" and head.get("mode") != "inline":
            not_inline.append(head.get("mode") or head.get("status") or "no header")
        if s.get("path") != "pd" or s.get("failures") or head.get("status") == "failed":
            failed += 1
        elif s.get("pulls") and s["bytes"] > 0 and s["seconds"] > 0:
            good.append((s["bytes"], s["seconds"]))
        elif not s.get("pulls") and head.get("status") == "ok" and head.get("ms"):
            good.append((head["bytes"], head["ms"] / 1000))
        else:
            failed += 1
    ms = median(sec * 1000 for _, sec in good)
    return {"condition": condition, "transport": transport, "words": words,
            "prompt_tokens": median(s["prompt_tokens"] for s in samples if s.get("prompt_tokens")),
            "samples": len(good), "failed": failed, "not_inline": not_inline,
            "transfers_per_request": median(s["pulls"] for s in samples if s.get("pulls")),
            "bytes": median(b for b, _ in good), "p50_ms": ms,
            "gb_s": median(b / sec / 1e9 for b, sec in good),
            "client_p50_ms": median(s["client_ms"] for s in samples)}


def compare(rows: list[dict], tcp_gb_s: dict[str, Optional[float]]) -> list[dict[str, Any]]:
    """Per condition and length: gRPC / NIXL and gRPC / raw TCP throughput, and whether the goal is met."""
    by = {(r["condition"], r["transport"], r["words"]): r for r in rows}
    out = []
    for r in rows:
        if r["transport"] != "grpc":
            continue
        nixl = by.get((r["condition"], "nixl", r["words"]))
        tcp = tcp_gb_s.get(r["condition"])
        g = r["gb_s"]
        vs_nixl = g / nixl["gb_s"] if g and nixl and nixl["gb_s"] else None
        vs_tcp = g / tcp if g and tcp else None
        nixl_vs_tcp = nixl["gb_s"] / tcp if nixl and nixl["gb_s"] and tcp else None
        met = None if vs_nixl is None or vs_tcp is None else (vs_nixl >= GOAL_VS_NIXL and vs_tcp >= GOAL_VS_TCP)
        out.append({"condition": r["condition"], "words": r["words"], "prompt_tokens": r["prompt_tokens"],
                    "grpc_vs_nixl": vs_nixl, "grpc_vs_tcp": vs_tcp, "nixl_vs_tcp": nixl_vs_tcp, "goal_met": met})
    return out


def _num(v: Optional[float], fmt: str, width: int) -> str:
    return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"


def format_condition(condition: str, tcp: dict[str, Any], rows: list[dict], ratios: list[dict]) -> list[str]:
    """The table of one condition: raw TCP, one row per transport and length, the ratios and goal."""
    gb = tcp.get("gb_s") or []
    lines = [f"== {condition}",
             f"  raw TCP prefill->decode: {_num(tcp.get('median_gb_s'), '.2f', 0)} GB/s "
             f"(median of {len(gb)} x {tcp.get('mib', '?')} MiB"
             + (f"; {min(gb):.2f}-{max(gb):.2f}" if gb else "") + ")",
             f"  {'transport':9} {'tokens':>6} {'MiB':>7} {'p50 ms':>8} {'GB/s':>6} {'client ms':>9} {'n':>3}  timed"]
    for r in rows:
        mib = r["bytes"] / MiB if r["bytes"] is not None else None
        lines.append(f"  {r['transport']:9} {_num(r['prompt_tokens'], '.0f', 6)} {_num(mib, '.2f', 7)} "
                     f"{_num(r['p50_ms'], '.2f', 8)} {_num(r['gb_s'], '.2f', 6)} {_num(r['client_p50_ms'], '.1f', 9)} "
                     f"{r['samples']:3d}  {TIMES.get(r['transport'], '')}")
    for r in rows:
        if (r.get("transfers_per_request") or 1) > 1:
            lines.append(f"  NOTE {r['transport']} {r['words']} words: the counters saw {r['transfers_per_request']:g} "
                         "transfers per request; its seconds are their sum")
        if r["failed"]:
            lines.append(f"  WARNING {r['transport']} {r['words']} words: {r['failed']} request(s) without a "
                         "successful pull (fallback, failure, or counters that did not move)")
        if r["not_inline"]:
            lines.append(f"  WARNING {r['transport']} {r['words']} words: {len(r['not_inline'])} response(s) not "
                         f"mode=inline: {sorted(set(r['not_inline']))}")
    if ratios:
        lines.append(f"  goal: gRPC >= {GOAL_VS_NIXL}x NIXL and >= {GOAL_VS_TCP}x raw TCP "
                     "(GB/s as above: NIXL's READ alone, gRPC's whole pull)")
        for q in ratios:
            verdict = {True: "met", False: "MISSED", None: "n/a"}[q["goal_met"]]
            lines.append(f"  {_num(q['prompt_tokens'], '.0f', 6)} tok: gRPC/NIXL {_num(q['grpc_vs_nixl'], '.2f', 5)}x"
                         f"  gRPC/TCP {_num(q['grpc_vs_tcp'], '.2f', 5)}x"
                         f"  (NIXL/TCP {_num(q['nixl_vs_tcp'], '.2f', 5)}x)"
                         f"  {verdict}")
    return lines


def tcp_stats(results: list[dict], mib: int) -> dict[str, Any]:
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in results if r["seconds"] > 0]
    return {"mib": mib, "gb_s": rates, "median_gb_s": median(rates)}


# ------------------------------------------------------------------ raw TCP (run inside the hosts)

def tcp_receive(host: str, port: int, count: int, timeout_s: float = 120.0) -> None:
    """Accept ``count`` streams one after the other; print one JSON line per stream (bytes, seconds)."""
    buf = memoryview(bytearray(4 * MiB))
    with socket.create_server((host, port)) as srv:
        srv.settimeout(timeout_s)
        for _ in range(count):
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout_s)
                t0, total = time.perf_counter(), 0
                while n := conn.recv_into(buf):
                    total += n
                seconds = time.perf_counter() - t0
            print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)


def tcp_send(host: str, port: int, nbytes: int, count: int, chunk: int = 4 * MiB, connect_s: float = 30.0) -> None:
    """Send ``count`` streams of ``nbytes`` in ``chunk`` sends, each after the receiver closed the last."""
    data = memoryview(b"\x5a" * chunk)
    for _ in range(count):
        deadline = time.monotonic() + connect_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=connect_s)
                break
            except OSError:  # the receiver is not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sock:
            sent = 0
            while sent < nbytes:
                sock.sendall(data[:min(chunk, nbytes - sent)])
                sent += min(chunk, nbytes - sent)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver's close: the stream is over at both ends


def parse_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def raw_tcp(lab, src: str, dst: str, mib: int, count: int, port: int) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    addr = lab.state().host(dst).address
    mod = "from pdserve.bench.lab_kv_transfer import "
    recv = [sys.executable, "-c", mod + f"tcp_receive; tcp_receive({addr!r}, {port}, {count})"]
    send = [sys.executable, "-c", mod + f"tcp_send; tcp_send({addr!r}, {port}, {mib * MiB}, {count})"]
    with ThreadPoolExecutor(1) as pool:
        receiver = pool.submit(lab.exec_in, dst, recv, timeout=600)
        lab.exec_in(src, send, timeout=600)
        return parse_json_lines(receiver.result().stdout)


# ------------------------------------------------------------------ the lab and its apps

def _head_python(lab, code: str, timeout: float = 300) -> str:
    init = "import json, ray; ray.init(address='auto', log_to_driver=False, logging_level='ERROR'); "
    return lab.exec_in(lab.state().head.name, [sys.executable, "-c", init + code], timeout=timeout).stdout


def free_resources(lab) -> Optional[list[dict[str, float]]]:
    """Each Ray node's free resources, or None when Ray would not say (a private API of Ray's)."""
    from pdserve.lab.errors import LabError

    code = ("from ray._private.state import available_resources_per_node as a; "
            "print(json.dumps(list(a().values())))")
    try:
        return json.loads(_head_python(lab, code).strip().splitlines()[-1])
    except (LabError, ValueError, IndexError) as e:
        print(f"WARNING: could not read the lab's free resources, deploying without the check: {e}")
        return None


def delete_app(lab, name: str) -> None:
    """Delete a benchmark app (none by that name is fine); a failure is printed, not raised."""
    from pdserve.lab.errors import LabError

    try:
        _head_python(lab, f"from ray import serve; serve.delete({name!r})")
    except LabError as e:
        print(f"WARNING: could not delete app {name}: {e}", file=sys.stderr)


def decode_totals(client, url: str) -> tuple[int, int, float, int]:
    reps = client.get(url + "/pdserve/status", timeout=30).json()["pools"]["decode"]
    return (sum(r["kv_transfers_total"] or 0 for r in reps), sum(r["kv_transfer_bytes_total"] or 0 for r in reps),
            sum(r["kv_transfer_seconds_total"] or 0.0 for r in reps),
            sum(r["kv_transfer_failures_total"] or 0 for r in reps))


def one_request(client, url: str, served: str, words: int) -> dict[str, Any]:
    before = decode_totals(client, url)
    # a fresh random prefix: every block differs from all before it, so decode pulls them all
    prefix = f"run {words}-{secrets.randbelow(10**6)}-{time.time_ns()} "
    body = {"model": served, "prompt": prefix + "token " * words,
            "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    resp = client.post(url + "/v1/completions", json=body)
    client_ms = (time.perf_counter() - t0) * 1000
    resp.raise_for_status()
    deadline = time.monotonic() + 10
    while ((after := decode_totals(client, url))[0] == before[0] and after[3] == before[3]
           and time.monotonic() < deadline):
        time.sleep(0.1)
    return {"prompt_tokens": resp.json()["usage"]["prompt_tokens"], "path": resp.headers.get("x-pdserve-path"),
            "header": parse_kv_header(resp.headers.get("x-pdserve-kv-transfer")), "client_ms": client_ms,
            "pulls": after[0] - before[0], "bytes": after[1] - before[1], "seconds": after[2] - before[2],
            "failures": after[3] - before[3]}


def measure(client, url: str, served: str, transport: str, condition: str, words: list[int],
            repeats: int) -> list[dict]:
    rows = []
    for w in words:
        one_request(client, url, served, w)  # warm-up: connections, handshakes, first-use allocations
        samples = [one_request(client, url, served, w) for _ in range(repeats)]
        rows.append(summarize(transport, condition, w, samples))
        r = rows[-1]
        print(f"  {condition:14} {transport:5} {_num(r['prompt_tokens'], '.0f', 5)} tok  "
              f"p50 {_num(r['p50_ms'], '.2f', 8)} ms  {_num(r['gb_s'], '.2f', 5)} GB/s  ({r['samples']} ok)",
              flush=True)
    return rows


def main(argv=None) -> int:
    import httpx
    import yaml

    from pdserve.settings.cluster import ClusterConfig
    from pdserve.lab.hosts import Lab, require_root
    from pdserve.lab.netfaults import LinkFault, active_faults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", default="50,200,800,1600", help="prompt lengths in words (~76..1626 tokens)")
    p.add_argument("--transports", default="nixl,grpc")
    p.add_argument("--repeats", type=int, default=5, help="measured requests per length (after one warm-up)")
    p.add_argument("--conditions", default="none,rate,delay", help="which of none, rate, delay to run")
    p.add_argument("--rate", default="10gbit", help="the rate condition's cap, a tc rate")
    p.add_argument("--delay", default="1ms", help="the delay condition's delay each way, in ms")
    p.add_argument("--tcp-mib", type=int, default=256, help="MiB per raw TCP stream")
    p.add_argument("--tcp-repeats", type=int, default=5)
    p.add_argument("--tcp-port", type=int, default=19600)
    p.add_argument("--keep", action="store_true", help="keep the benchmark apps (and a lab this run made)")
    p.add_argument("--json", default=None, help="default bench/results/lab_kv_transfer-<date>.json")
    args = p.parse_args(argv)
    words = [int(w) for w in args.words.split(",")]
    transports = args.transports.split(",")
    faults = {"none": None, "rate": LinkFault(rate=args.rate), "delay": LinkFault(delay_ms=parse_delay_ms(args.delay))}
    labels = {"none": "no fault", "rate": f"rate {args.rate}", "delay": f"delay {parse_delay_ms(args.delay):g}ms"}
    conditions = args.conditions.split(",")
    unknown = (set(conditions) - set(faults)) | (set(transports) - set(APPS))
    if unknown:
        p.error(f"unknown condition or transport: {sorted(unknown)}")
    if max(words) > MAX_MODEL_LEN - 256:
        p.error(f"--words up to {MAX_MODEL_LEN - 256}: the prompt must fit max_model_len {MAX_MODEL_LEN}")

    configs = {}
    for t in transports:
        file, name, port, side = APPS[t]
        raw = yaml.safe_load((ROOT / "configs" / file).read_text())
        configs[t] = bench_config(raw, name=name, port=port, side_channel_base_port=side)
    validated = {t: ClusterConfig.model_validate(c) for t, c in configs.items()}
    first = validated[transports[0]]
    src, dst = host_of_pool(first, "prefill"), host_of_pool(first, "decode")
    now = dt.datetime.now()

    require_root()  # namespaces and network faults
    lab = Lab()
    made = not lab.exists()
    if made:
        print(f"no lab is up: making one from {APPS[transports[0]][0]} ...", flush=True)
        lab.up(first.lab)
    urls: dict[str, str] = {}
    out: dict[str, Any] = {"client": CLIENT, "date": now.isoformat(timespec="seconds"),
                           "workload": {"model": f"builtin:{MODEL}", "kv_bytes_per_token": 32 * 1024, "words": words,
                                        "repeats": args.repeats, "max_tokens": 2, "hosts": [src, dst],
                                        "tcp_mib": args.tcp_mib, "tcp_repeats": args.tcp_repeats},
                           "timed": TIMES, "tcp": {}, "rows": [], "ratios": [], "errors": []}
    try:
        if lab.faults_dir.is_dir() and (pre := active_faults(lab.faults_dir)):
            print(f"WARNING: network faults already in force (this run clears {src}<->{dst}'s): {pre}")
        for t in transports:  # a kept run's apps, so that the room check sees the lab without them
            if APPS[t][1] in lab.state().deployed:
                delete_app(lab, APPS[t][1])
        needs = [n for t in transports for n in resource_needs(validated[t])]
        free = free_resources(lab)
        if free is not None and (missing := unplaceable(free, needs)):
            raise SystemExit(f"the lab has no room for the benchmark apps ({missing} find no host); it serves "
                             f"{sorted(lab.state().deployed)}: free the cores (ray.serve.delete an app, or "
                             "`pdserve lab down` and let this script make a lab of its own)")
        with tempfile.TemporaryDirectory() as tmp:
            for t in transports:
                path = Path(tmp) / f"{APPS[t][1]}.yaml"
                path.write_text(yaml.safe_dump(configs[t], sort_keys=False))
                print(f"deploying {APPS[t][1]} ({t}) ...", flush=True)
                urls[t] = lab.deploy(path, APPS[t][1], APPS[t][2])

        with httpx.Client(timeout=300) as client:
            for c in conditions:
                label = labels[c]
                if faults[c] is not None:
                    lab.fault(src, dst, faults[c])
                try:
                    tcp = tcp_stats(raw_tcp(lab, src, dst, args.tcp_mib, args.tcp_repeats, args.tcp_port), args.tcp_mib)
                    out["tcp"][label] = tcp
                    print(f"  {label:14} raw TCP {_num(tcp['median_gb_s'], '.2f', 5)} GB/s", flush=True)
                    for t in transports:
                        served = configs[t]["model"].get("served_name", "tiny")
                        out["rows"] += measure(client, urls[t], served, t, label, words, args.repeats)
                except Exception as e:  # keep what the other conditions measure
                    print(f"WARNING: {label}: {type(e).__name__}: {e}", flush=True)
                    out["errors"].append(f"{label}: {type(e).__name__}: {e}")
                finally:
                    if faults[c] is not None:
                        lab.clear_faults(src, dst)
    finally:
        if made and not args.keep:
            lab.down()
        elif not args.keep:
            for t in transports:  # also an app whose deploy failed half-way
                delete_app(lab, APPS[t][1])

    out["ratios"] = compare(out["rows"], {k: v["median_gb_s"] for k, v in out["tcp"].items()})
    print(f"\nKV transfer across lab hosts ({src} -> {dst}): NIXL vs inline gRPC vs raw TCP")
    print(f"client: {CLIENT} (this script); date: {out['date']}")
    print(f"workload: builtin:{MODEL} (32 KiB KV/token), prompts of {args.words} words one at a time, fresh random "
          f"prefix, max_tokens 2, 1 warm-up + {args.repeats} measured per length; medians")
    print("timed: NIXL's ms = the decode engine's NIXL READ alone; gRPC's ms = the whole pull (request, stream, "
          "checksums, copy into the KV cache); client ms = the whole request, for both; raw TCP = receiver's clock")
    for c in conditions:
        label = labels[c]
        rows = [r for r in out["rows"] if r["condition"] == label]
        ratios = [q for q in out["ratios"] if q["condition"] == label]
        print("\n".join(format_condition(label, out["tcp"].get(label, {}), rows, ratios)))
    for e in out["errors"]:
        print(f"ERROR {e}")
    path = Path(args.json) if args.json else ROOT / "bench" / "results" / f"lab_kv_transfer-{now:%Y-%m-%d-%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
