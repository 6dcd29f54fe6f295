"""``pdserve chaos``: the chaos harness from the command line, through the router's admin API.

    pdserve chaos --url http://127.0.0.1:8000 kill-links
    pdserve chaos --url ... heal-links
    pdserve chaos --url ... faults --fail 0.3 --delay-s 2 [--corrupt 0.1]
    pdserve chaos --url ... kill-replica --pool prefill [--replica ID]
    pdserve chaos --url ... status

The admin key comes from --admin-key, else $PDSERVE_ADMIN_KEY, else (loopback URLs only)
the development key that the shipped CPU configs carry.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlparse

from pdserve.router.config import DEV_ADMIN_KEY, is_loopback


def add_parser(sub) -> None:
    c = sub.add_parser("chaos", help="inject KV-link and replica faults into a running cluster")
    c.add_argument("--url", required=True, help="the router, e.g. http://127.0.0.1:8000")
    c.add_argument("--admin-key", default=None)
    acts = c.add_subparsers(dest="action", required=True)
    acts.add_parser("kill-links", help="every KV link refuses transfers (both transports)")
    acts.add_parser("heal-links", help="clear every injected fault")
    f = acts.add_parser("faults", help="fail, delay or corrupt a fraction of transfers")
    f.add_argument("--fail", type=float, default=None, help="fraction of transfers that fail")
    f.add_argument("--delay-s", type=float, default=None, help="stall each affected transfer this long (gRPC)")
    f.add_argument("--delay-fraction", type=float, default=None)
    f.add_argument("--corrupt", type=float, default=None, help="fraction of transfers corrupted (gRPC)")
    f.add_argument("--force-inline", action="store_true", default=None,
                   help="same-host pulls get the bytes in the stream, as across hosts (gRPC)")
    f.add_argument("--drop-kv-params", action="store_true", default=None,
                   help="prefill legs finish without handing off their KV, so every request falls back (gRPC)")
    k = acts.add_parser("kill-replica", help="SIGKILL one replica process; Ray Serve replaces it")
    k.add_argument("--pool", required=True, choices=["prefill", "decode", "monolithic"])
    k.add_argument("--replica", default=None)
    acts.add_parser("status", help="faults per engine and breaker state per link")
    c.set_defaults(fn=run)


def admin_key_for(args) -> str | None:
    if args.admin_key:
        return args.admin_key
    if os.environ.get("PDSERVE_ADMIN_KEY"):
        return os.environ["PDSERVE_ADMIN_KEY"]
    host = urlparse(args.url).hostname or ""
    return DEV_ADMIN_KEY if is_loopback(host) else None


def _request(args) -> tuple[str, str, dict | None]:
    a = args.action
    if a == "status":
        return "GET", "/admin/chaos", None
    if a == "faults":
        spec = {k: v for k, v in (("fail", args.fail), ("delay_s", args.delay_s),
                                   ("delay_fraction", args.delay_fraction), ("corrupt", args.corrupt),
                                   ("force_inline", args.force_inline),
                                   ("drop_kv_params", args.drop_kv_params)) if v is not None}
        if not spec:
            raise SystemExit("pdserve chaos faults: give at least one of --fail, --delay-s, --corrupt, "
                             "--force-inline, --drop-kv-params")
        return "POST", "/admin/chaos/faults", spec
    if a == "kill-replica":
        body = {"pool": args.pool}
        if args.replica:
            body["replica"] = args.replica
        return "POST", "/admin/chaos/kill-replica", body
    return "POST", f"/admin/chaos/{a}", {}


def run(args) -> int:
    key = admin_key_for(args)
    if key is None:
        print("pdserve chaos: this URL is not loopback: give --admin-key or set PDSERVE_ADMIN_KEY", file=sys.stderr)
        return 2
    method, path, body = _request(args)
    return call_admin(args.url, key, method, path, body, f"chaos {args.action}")


def call_admin(url: str, key: str, method: str, path: str, body: dict | None, label: str) -> int:
    """One admin API call; prints the JSON answer, or the error naming the problem."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            print(json.dumps(json.load(r), indent=2))
            return 0
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except Exception:  # noqa: BLE001
            message = e.reason
        print(f"pdserve {label}: HTTP {e.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"pdserve {label}: cannot reach {url}: {e}", file=sys.stderr)
        return 1
