"""The ``pdserve`` command: serve a config, show its status, build the tiny model."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request


SET_HELP = ("override one config key, a dotted path with a YAML value, e.g. router.disaggregation=always "
            "(repeatable)")


def _cmd_model(args) -> int:
    from pdserve.engine.tiny_model import BUILTIN_MODELS, write_tiny_model

    if args.name not in BUILTIN_MODELS:
        print(f"pdserve model: unknown model {args.name!r}; available: {', '.join(BUILTIN_MODELS)}", file=sys.stderr)
        return 2
    out = write_tiny_model(args.out, args.name)
    print(f"wrote the {args.name} model to {out}")
    return 0


def _cmd_serve(args) -> int:
    from pdserve.settings.cluster import load_config

    if args.detach and not args.address:
        print("pdserve serve: --detach needs --address (a local Ray cluster stops with this command)",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.set)
    except Exception as e:
        print(f"pdserve serve: bad config {args.config}: {e}", file=sys.stderr)
        return 2
    from pdserve.kv_transfer import vllm_internals

    try:  # vLLM and NIXL as installed here (the engines check their own before they start)
        vllm_internals.check_versions(required=False)
    except vllm_internals.UntestedVersionError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    from pdserve.cluster.runtime import start_cluster, stop_cluster

    url = start_cluster(cfg, port=args.port, address=args.address)
    if args.detach:
        # Ray Serve's controller outlives this driver: the application keeps serving.
        print(f"pdserve: {cfg.mode} cluster {cfg.name!r} deployed on {url}; it runs until its Ray cluster "
              "stops or `serve shutdown`", flush=True)
        return 0
    # Installed after ray.init, which sets handlers of its own.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pdserve: {cfg.mode} cluster {cfg.name!r} listening on {url} (OpenAI API at {url}/v1)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("pdserve: shutting down", flush=True)
        stop_cluster()
    return 0


def _cmd_status(args) -> int:
    url = args.url
    if url is None:
        from pdserve.settings.cluster import load_config

        cfg = load_config(args.config)
        url = f"http://{cfg.router.host}:{cfg.router.port}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/pdserve/status", timeout=10) as r:
            status = json.load(r)
    except (urllib.error.URLError, OSError) as e:
        print(f"pdserve status: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict) -> None:
    """The human-readable status: pools, replicas, and the chaos faults active on any of them."""
    print(f"cluster {status['name']}  mode={status['mode']}  transport={status['transport']}")
    for pool, replicas in status["pools"].items():
        print(f"  pool {pool}: {len(replicas)} replica(s)")
        for r in replicas:
            print(f"    {r['replica']:<12} healthy={r['healthy']!s:<5} running={r['running']} waiting={r['waiting']} "
                  f"kv={r['kv_cache_usage'] or 0:.3f} inflight={r['inflight']} cores={r['cores']} pid={r['pid']}")
            if r.get("faults"):
                faults = " ".join(f"{k}={v}" for k, v in sorted(r["faults"].items()))
                print(f"      ACTIVE FAULTS: {faults}  (pdserve chaos heal-links clears them)")


def _cmd_demo(args) -> int:
    from pdserve.cluster.demo import run_demo

    return run_demo(args.config, args.port, args.exit, args.set)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode serving on Ray Serve + vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start a cluster from a config and serve until SIGINT/SIGTERM")
    s.add_argument("--config", required=True)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--address", default=None, help="join an existing Ray cluster (default: start a local one)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument("--detach", action="store_true",
                   help="with --address: deploy, wait until healthy, and exit, leaving the application serving")
    s.set_defaults(fn=_cmd_serve)

    d = sub.add_parser("demo", help="start a cluster, send a streamed and a non-streamed chat with the openai client")
    d.add_argument("--config", default="configs/cpu-pd.yaml")
    d.add_argument("--port", type=int, default=None)
    d.add_argument("--exit", action="store_true", help="stop after the demo requests instead of serving on")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    d.set_defaults(fn=_cmd_demo)

    st = sub.add_parser("status", help="show pools, replicas and their load")
    g = st.add_mutually_exclusive_group(required=True)
    g.add_argument("--url")
    g.add_argument("--config")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)

    from pdserve.bench import ab, bench_cli
    from pdserve.cluster import admin_cli, chaos_cli, lab_cli
    from pdserve.planner import cli as plan_cli

    chaos_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    ab.add_parser(sub)
    admin_cli.add_parser(sub)
    lab_cli.add_parser(sub)

    m = sub.add_parser("model", help="write a built-in model directory")
    m.add_argument("name", help="built-in model name (tiny, tiny-wide)")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=_cmd_model)

    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # bench/ starts and stops clusters with it; nothing imports cluster/
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
