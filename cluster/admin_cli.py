"""``pdserve admin``: operator controls other than chaos.

    pdserve admin --url http://127.0.0.1:8000 ladder --set 2    force rung 2 (game day)
    pdserve admin --url ... ladder --auto                       back to the KV signal
    pdserve admin --url ... ladder                              show the rung
    pdserve admin --url ... ab --set 0.2                        serve 20 % of sessions monolithically (online A/B)
    pdserve admin --url ... ab                                  show the split
    pdserve admin hash-key KEY                                  the digest to put in auth.tenants[].key_sha256
"""
from __future__ import annotations

import sys

from pdserve.cluster.chaos_cli import admin_key_for, call_admin


def add_parser(sub) -> None:
    a = sub.add_parser("admin", help="operator controls: force a degradation rung, hash an API key")
    a.add_argument("--url", default=None, help="the router, e.g. http://127.0.0.1:8000")
    a.add_argument("--admin-key", default=None)
    acts = a.add_subparsers(dest="action", required=True)
    lad = acts.add_parser("ladder", help="show, force (--set N) or release (--auto) the degradation rung")
    g = lad.add_mutually_exclusive_group()
    g.add_argument("--set", type=int, default=None, metavar="N", help="force rung N (0..4)")
    g.add_argument("--auto", action="store_true", help="let the KV signal drive the ladder again")
    ab = acts.add_parser("ab", help="show or set (--set F) the online A/B split of a P/D cluster")
    ab.add_argument("--set", type=float, default=None, metavar="F", help="fraction of sessions served monolithically")
    h = acts.add_parser("hash-key", help="print the SHA-256 digest of an API key for the config")
    h.add_argument("key")
    a.set_defaults(fn=run)


def run(args) -> int:
    if args.action == "hash-key":
        from pdserve.admission.tenants import hash_key

        print(hash_key(args.key))
        return 0
    if not args.url:
        print(f"pdserve admin {args.action}: --url is required", file=sys.stderr)
        return 2
    if args.action == "ab":
        if args.set is not None and not 0.0 <= args.set <= 1.0:
            print(f"pdserve admin ab: --set takes a fraction from 0 to 1, got {args.set}", file=sys.stderr)
            return 2
    elif args.set is not None and not 0 <= args.set <= 4:
        print(f"pdserve admin ladder: --set takes a rung from 0 to 4, got {args.set}", file=sys.stderr)
        return 2
    key = admin_key_for(args)
    if key is None:
        print("pdserve admin: this URL is not loopback: give --admin-key or set PDSERVE_ADMIN_KEY", file=sys.stderr)
        return 2
    if args.action == "ab":
        if args.set is not None:
            return call_admin(args.url, key, "POST", "/admin/ab", {"monolithic_fraction": args.set}, "admin ab")
        return call_admin(args.url, key, "GET", "/admin/ab", None, "admin ab")
    if args.set is not None:
        return call_admin(args.url, key, "POST", "/admin/ladder", {"rung": args.set}, "admin ladder")
    if args.auto:
        return call_admin(args.url, key, "POST", "/admin/ladder", {"auto": True}, "admin ladder")
    return call_admin(args.url, key, "GET", "/admin/ladder", None, "admin ladder")
