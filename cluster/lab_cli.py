"""``pdserve lab``: a multi-host cluster on one Linux machine, and real faults between its hosts.

    pdserve lab up --config configs/cpu-lab-pd.yaml     # hosts, Ray nodes, deploy; prints the URL
    pdserve lab deploy --config configs/cpu-lab-pd-grpc.yaml   # another config onto the same hosts
    pdserve lab status                                  # hosts, addresses, Ray nodes, routers, faults
    pdserve lab fault prefill decode --down             # partition (or --loss, --delay, --rate)
    pdserve lab fault prefill decode --clear
    pdserve lab kill-host decode                        # every process of the host, at once
    pdserve lab start-host decode
    pdserve lab down                                    # removes everything, also after a crash
"""
from __future__ import annotations

import json
import sys
import urllib.request

from pdserve.lab.errors import LabError


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="a multi-host cluster on this machine (needs root), with real network faults")
    acts = lab.add_subparsers(dest="action", required=True)
    up = acts.add_parser("up", help="make the config's lab hosts, join them as Ray nodes, deploy the config")
    up.add_argument("--config", required=True)
    dep = acts.add_parser("deploy", help="deploy another config onto the lab's hosts")
    dep.add_argument("--config", required=True)
    st = acts.add_parser("status", help="hosts, addresses, Ray nodes, routers, replicas and active faults")
    st.add_argument("--json", action="store_true")
    acts.add_parser("down", help="remove every namespace, bridge and process of the lab (idempotent)")
    f = acts.add_parser("fault", help="a network fault between two hosts, or a host and everyone")
    f.add_argument("host")
    f.add_argument("peer", nargs="?", default=None, help="the other host (default: everyone)")
    kind = f.add_mutually_exclusive_group(required=True)
    kind.add_argument("--down", action="store_true", help="partition: drop every packet")
    kind.add_argument("--loss", type=float, metavar="PCT", help="drop this percentage of packets, each way")
    kind.add_argument("--delay", type=float, metavar="MS", help="hold each packet this long, each way")
    kind.add_argument("--rate", metavar="RATE", help="cap the bandwidth each way, e.g. 10gbit, 100mbit")
    kind.add_argument("--clear", action="store_true", help="remove the fault(s)")
    f.add_argument("--jitter", type=float, default=0.0, metavar="MS", help="with --delay: +/- this much")
    k = acts.add_parser("kill-host", help="kill every process of a host at once")
    k.add_argument("host")
    s = acts.add_parser("start-host", help="start a killed host again (not the head)")
    s.add_argument("host")
    lab.set_defaults(fn=run)


def run(args) -> int:
    from pdserve.lab.hosts import Lab

    try:
        return _ACTIONS[args.action](Lab(), args)
    except LabError as e:
        print(f"pdserve lab {args.action}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"pdserve lab {args.action}: {e}", file=sys.stderr)
        return 2


def _load(path: str):
    from pdserve.settings.cluster import load_config

    cfg = load_config(path)
    if cfg.lab is None:
        raise ValueError(f"{path} has no 'lab' section naming its hosts (see configs/cpu-lab-pd.yaml)")
    return cfg


def _up(lab, args) -> int:
    cfg = _load(args.config)
    state = lab.up(cfg.lab)
    for h in state.hosts:
        print(f"host {h.name:<10} {h.address:<15} {'head' if h.head else ''}", flush=True)
    print(f"Ray cluster at {state.ray_address}; deploying {cfg.name} ...", flush=True)
    url = lab.deploy(args.config, cfg.name, cfg.router.port)
    print(f"pdserve lab: {cfg.name} serving at {url} (OpenAI API at {url}/v1)")
    return 0


def _deploy(lab, args) -> int:
    cfg = _load(args.config)
    url = lab.deploy(args.config, cfg.name, cfg.router.port)
    print(f"pdserve lab: {cfg.name} serving at {url} (OpenAI API at {url}/v1)")
    return 0


def _status(lab, args) -> int:
    status = lab.status()
    for name, url in status["routers"].items():
        try:
            with urllib.request.urlopen(url + "/pdserve/status", timeout=5) as r:
                status.setdefault("replicas", {})[name] = json.load(r)["pools"]
        except OSError as e:
            status.setdefault("replicas", {})[name] = {"error": str(e)}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print_status(status)
    return 0


def print_status(status: dict) -> None:
    print("hosts:")
    for h in status["hosts"]:
        role = "head" if h["head"] else ", ".join(h["resources"])
        print(f"  {h['name']:<10} {h['address']:<15} {'up' if h['up'] else 'DOWN':<5} netns={h['netns']} {role}")
    print(f"Ray nodes (GCS {status['ray_address']}):")
    for n in status["ray_nodes"]:
        if "error" in n:
            print(f"  unreachable: {n['error']}")
        else:
            print(f"  {n['address']:<15} {'alive' if n['alive'] else 'dead':<6} {n['resources']}")
    for name, url in status["routers"].items():
        print(f"router {name}: {url}")
        pools = status.get("replicas", {}).get(name, {})
        if "error" in pools:
            print(f"  unreachable: {pools['error']}")
            continue
        for pool, replicas in pools.items():
            for r in replicas:
                print(f"  {pool:<8} {r['replica']:<10} healthy={r['healthy']}")
    for f in status["network_faults"]:
        what = {k: v for k, v in f.items() if k in ("down", "loss_pct", "delay_ms", "jitter_ms", "rate") and v}
        print(f"NETWORK FAULT {f['a']} <-> {f['b'] or 'everyone'}: {what}")


def _down(lab, args) -> int:
    lab.down()
    print("pdserve lab: down")
    return 0


def _fault(lab, args) -> int:
    from pdserve.lab.netfaults import LinkFault

    if args.clear:
        lab.clear_faults(args.host, args.peer)
        print(f"pdserve lab: cleared faults of {args.host} <-> {args.peer or 'everyone'}")
        return 0
    fault = LinkFault(down=args.down, loss_pct=args.loss or 0.0, delay_ms=args.delay or 0.0,
                      jitter_ms=args.jitter, rate=args.rate)
    lab.fault(args.host, args.peer, fault)
    print(f"pdserve lab: {args.host} <-> {args.peer or 'everyone'}: {fault}")
    return 0


def _kill_host(lab, args) -> int:
    lab.kill_host(args.host)
    print(f"pdserve lab: killed every process of host {args.host}")
    return 0


def _start_host(lab, args) -> int:
    lab.start_host(args.host)
    print(f"pdserve lab: host {args.host} is back in the Ray cluster")
    return 0


_ACTIONS = {"up": _up, "deploy": _deploy, "status": _status, "down": _down, "fault": _fault,
            "kill-host": _kill_host, "start-host": _start_host}
