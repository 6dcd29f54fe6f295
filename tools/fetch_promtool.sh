#!/bin/sh
# Usage: tools/fetch_promtool.sh DEST        (make setup: .cache/bin/promtool)
#
# promtool checks the Prometheus alert rules and runs their unit tests
# (tests/test_deploy_artifacts.py). No PyPI package carries it; Debian's `prometheus` package
# does. DEST becomes, in this order:
#  * a link to $PROMTOOL, or to the promtool on PATH, when there is one;
#  * promtool unpacked (dpkg-deb -x: nothing is installed) from the prometheus .deb in apt's
#    archive cache ($APT_ARCHIVES, default /var/cache/apt/archives; works offline), or else
#    from `apt-get download prometheus` (after an `apt-get update` when that fails and we are
#    root: a fresh machine has no package lists).
# make runs this only while DEST is missing: delete it to fetch again.
set -eu
dest=${1:?usage: $0 DEST}
mkdir -p "$(dirname "$dest")"

existing=${PROMTOOL:-}
[ -n "$existing" ] || existing=$(command -v promtool || true)
if [ -n "$existing" ]; then
    [ -x "$existing" ] || { echo "fetch_promtool: $existing is not executable" >&2; exit 1; }
    ln -sfn "$(readlink -f "$existing")" "$dest"
    echo "fetch_promtool: $dest -> $existing"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || {
        echo "fetch_promtool: no promtool on PATH or in \$PROMTOOL, and no $tool to take it from" \
             "Debian's prometheus package: install promtool (Prometheus) and set PROMTOOL" >&2
        exit 1
    }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
deb=$(ls -v "${APT_ARCHIVES:-/var/cache/apt/archives}"/prometheus_*.deb 2>/dev/null | tail -n 1 || true)
if [ -z "$deb" ]; then
    if ! (cd "$tmp" && apt-get download prometheus); then
        [ "$(id -u)" = 0 ] || { echo "fetch_promtool: apt-get download prometheus failed" >&2; exit 1; }
        apt-get update -qq
        (cd "$tmp" && apt-get download prometheus)
    fi
    deb=$(ls "$tmp"/prometheus_*.deb)
fi
echo "fetch_promtool: unpacking promtool from $deb"
dpkg-deb -x "$deb" "$tmp/x"
[ -f "$tmp/x/usr/bin/promtool" ] || { echo "fetch_promtool: $deb holds no usr/bin/promtool" >&2; exit 1; }
cp "$tmp/x/usr/bin/promtool" "$dest.partial"
chmod 755 "$dest.partial"
mv -f "$dest.partial" "$dest"
"$dest" --version 2>&1 | head -n 1
