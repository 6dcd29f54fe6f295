"""PID 1 of a lab host: makes the host's own view of the machine, runs its Ray node, reaps.

Started by lab/hosts.py as ``ip netns exec NS unshare --pid --fork --kill-child --mount-proc
--uts --mount --propagation private python -m pdserve.lab.hostinit ...``: it is already inside
the host's network, PID, UTS and mount namespaces. It sets the host name, gives the host its own
/dev/shm (a tmpfs), /tmp and /etc/hosts (bind mounts, visible to this host alone), then runs the
command (``ray start ... --block``) and reaps every process that ends up orphaned in the host, as
an init must. When it dies, the kernel kills every process of the host.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def prepare_host(name: str, tmp_dir: str, hosts_file: str, shm_mb: int) -> None:
    socket.sethostname(name)
    _mount("-t", "tmpfs", "-o", f"size={shm_mb}m,mode=1777", "tmpfs", "/dev/shm")
    _mount("--bind", tmp_dir, "/tmp")
    _mount("--bind", hosts_file, "/etc/hosts")


def run_as_init(argv: list[str]) -> int:
    child = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.lab.hostinit")
    p.add_argument("--name", required=True)
    p.add_argument("--tmp", required=True)
    p.add_argument("--hosts-file", required=True)
    p.add_argument("--shm-mb", type=int, default=512)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if os.getpid() != 1:
        print("pdserve.lab.hostinit must run as PID 1 of a new PID namespace", file=sys.stderr)
        return 2
    prepare_host(args.name, args.tmp, args.hosts_file, args.shm_mb)
    print(f"lab host {args.name}: {' '.join(command)}", flush=True)
    return run_as_init(command)


if __name__ == "__main__":
    sys.exit(main())
