"""`pdserve lab`: several hosts on one Linux machine, joined as one Ray cluster.

A host is a network namespace (``pdlab-<name>``, interface ``eth0`` with its own address on the
bridge ``pdlab0``) plus its own PID, UTS and mount namespaces, /dev/shm, /tmp and /etc/hosts
(lab/hostinit.py is its PID 1). Two hosts cannot see each other's processes or shared memory,
as two pods or two machines cannot, and talk only through the bridge, where lab/netfaults.py
enters faults in the kernel. Each host runs one Ray node (``ray start --block``); the head
host's also runs Ray's GCS. Configs are deployed from inside the head host, like any multi-node
Ray cluster (``pdserve serve --address``).

State lives in one root-only folder (``PDSERVE_LAB_DIR``, default /var/tmp/pdserve-lab), and
``down`` also removes what a crash left without it: every ``pdlab-*`` namespace, their
processes, and the bridge.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pdserve.lab import netfaults
from pdserve.lab.errors import LabError
from pdserve.lab.ray_internals import node_env
from pdserve.lab.spec import LabSpec

BRIDGE = "pdlab0"
NETNS_PREFIX = "pdlab-"
STATE_FILE = "lab.json"
NODE_WAIT_S = 120.0
DEPLOY_TIMEOUT_S = 900.0


def lab_dir() -> Path:
    return Path(os.environ.get("PDSERVE_LAB_DIR", "/var/tmp/pdserve-lab"))


def require_code_outside_tmp(paths: Optional[list[str]] = None) -> None:
    """Each lab host mounts a /tmp of its own (hostinit.py), so a Python, virtualenv or
    checkout under /tmp is not there inside the hosts: refuse at once, naming the fix."""
    for path in paths if paths is not None else [sys.executable, sys.prefix, str(Path(__file__).resolve())]:
        if Path(path).is_relative_to("/tmp"):
            raise LabError(f"{path} lies under /tmp, which each lab host replaces with its own: run pdserve "
                           "from a checkout and virtualenv outside /tmp (e.g. /var/tmp or your home)")


@dataclass
class HostState:
    name: str
    address: str
    head: bool
    cpus: int
    resources: dict[str, float]
    init_pid: Optional[int] = None  # the `unshare` process; its child is the host's PID 1

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def bridge_port(self) -> str:
        return f"pdl-{self.name}"[:15]

    def endpoint(self) -> netfaults.Endpoint:
        return netfaults.Endpoint(self.name, self.netns, self.address, "eth0", self.bridge_port)


@dataclass
class LabState:
    subnet: str
    bridge_address: str
    ray_port: int
    object_store_mb: int
    hosts: list[HostState]
    deployed: dict[str, str] = field(default_factory=dict)  # app name -> router URL

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no lab host named {name!r}; hosts: {', '.join(h.name for h in self.hosts)}")

    @property
    def head(self) -> HostState:
        return next(h for h in self.hosts if h.head)

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{self.ray_port}"

    @classmethod
    def from_spec(cls, spec: LabSpec) -> "LabState":
        hosts = [HostState(h.name, spec.address_of(h.name), h.head, h.cpus, dict(h.resources)) for h in spec.hosts]
        return cls(spec.subnet, spec.bridge_address(), spec.ray_port, spec.object_store_mb, hosts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LabState":
        data = json.loads(text)
        data["hosts"] = [HostState(**h) for h in data["hosts"]]
        return cls(**data)


def run(argv: list[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} not found: pdserve lab needs iproute2 and util-linux (`make setup` "
                       "installs what is missing)") from None
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("pdserve lab makes network, PID and mount namespaces and a bridge: it needs root "
                       "(CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo or as root")
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise LabError(f"pdserve lab needs `{tool}` (Debian packages iproute2 and util-linux)")


class Lab:
    """A lab on this machine, as recorded in its state folder."""

    def __init__(self, root: Optional[Path] = None) -> None:
        self.root = root or lab_dir()

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def faults_dir(self) -> Path:
        return self.root / "faults"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def state(self) -> LabState:
        if not self.exists():
            raise LabError("no lab is up on this machine: start one with `pdserve lab up --config FILE`")
        return LabState.from_json(self.state_path.read_text())

    def _save(self, state: LabState) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.state_path)

    @property
    def token_path(self) -> Path:
        return self.root / "ray_auth_token"

    def env(self) -> dict[str, str]:
        """The environment of every lab process: Ray's token authentication with the lab's own token,
        so a lab never depends on (or joins) whatever Ray state this machine's user has, and Ray's
        workers at pdserve's niceness (lab/ray_internals.py)."""
        return node_env(dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                             RAY_USAGE_STATS_ENABLED="0"))

    def _host_dir(self, name: str) -> Path:
        return self.root / "hosts" / name

    # ------------------------------------------------------------------ up
    def up(self, spec: LabSpec) -> LabState:
        require_root()
        require_code_outside_tmp()
        if self.exists():
            raise LabError(f"a lab is already up (state in {self.root}); `pdserve lab down` removes it")
        leftovers = _lab_namespaces()
        if leftovers or _link_exists(BRIDGE):
            raise LabError(f"a lab's namespaces or bridge are still there ({', '.join(leftovers) or BRIDGE}); "
                           "`pdserve lab down` removes them")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        state = LabState.from_spec(spec)
        self._save(state)
        self.token_path.write_text(secrets.token_hex(32))
        os.chmod(self.token_path, 0o600)
        try:
            self._make_network(state)
            self._write_hosts_file(state)
            for host in [state.head] + [h for h in state.hosts if not h.head]:
                self._start_host(state, host)
                if host.head:
                    _wait_port(host.address, state.ray_port, NODE_WAIT_S)
            self.wait_nodes(len(state.hosts))
        except BaseException as e:
            logs = self._log_tails(state)
            self.down()
            if isinstance(e, LabError):
                raise LabError(f"{e}\n{logs}") from None
            raise
        return self.state()

    def _log_tails(self, state: LabState, lines: int = 15) -> str:
        out = []
        for h in state.hosts:
            log = self._host_dir(h.name) / "host.log"
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- host {h.name}:\n" + "\n".join(tail))
        return "\n".join(out)

    def _make_network(self, state: LabState) -> None:
        prefix = state.subnet.split("/")[1]
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{state.bridge_address}/{prefix}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for h in state.hosts:
            run(["ip", "netns", "add", h.netns])
            run(["ip", "link", "add", h.bridge_port, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
            run(["ip", "link", "set", h.bridge_port, "master", BRIDGE])
            run(["ip", "link", "set", h.bridge_port, "up"])
            run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/{prefix}", "dev", "eth0"])
            run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
            run(["ip", "-n", h.netns, "link", "set", "lo", "up"])

    def _write_hosts_file(self, state: LabState) -> None:
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in state.hosts]
        (self.root / "etc-hosts").write_text("\n".join(lines) + "\n")

    def _ray_command(self, state: LabState, host: HostState) -> list[str]:
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--node-ip-address", host.address, "--num-cpus", str(host.cpus),
                  "--resources", json.dumps(host.resources), "--disable-usage-stats",
                  "--object-store-memory", str(state.object_store_mb << 20), "--block"]
        if host.head:
            return [ray, "start", "--head", "--port", str(state.ray_port), "--include-dashboard=false", *common]
        return [ray, "start", "--address", state.ray_address, *common]

    def _start_host(self, state: LabState, host: HostState) -> None:
        host_dir = self._host_dir(host.name)
        tmp = host_dir / "tmp"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o1777)
        argv = ["ip", "netns", "exec", host.netns,
                "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--uts", "--mount",
                "--propagation", "private",
                sys.executable, "-m", "pdserve.lab.hostinit", "--name", host.name, "--tmp", str(tmp),
                "--hosts-file", str(self.root / "etc-hosts"), "--shm-mb", str(state.object_store_mb + 256),
                "--", *self._ray_command(state, host)]
        log = open(host_dir / "host.log", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=self.env())
        log.close()
        host.init_pid = proc.pid
        self._save(state)

    def wait_nodes(self, count: int, timeout_s: float = NODE_WAIT_S) -> list[dict[str, Any]]:
        """Wait until Ray counts ``count`` live nodes; return them."""
        deadline = time.monotonic() + timeout_s
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                nodes = [n for n in self.ray_nodes() if n["alive"]]
            except LabError:
                nodes = []
            if len(nodes) >= count:
                return nodes
            time.sleep(1)
        raise LabError(f"only {len(nodes)} of {count} lab hosts joined the Ray cluster within {timeout_s:.0f}s")

    def ray_nodes(self) -> list[dict[str, Any]]:
        code = ("import json, ray; ray.init(address='auto', log_to_driver=False, logging_level='ERROR'); "
                "print(json.dumps([{'node_id': n['NodeID'], 'address': n['NodeManagerAddress'], 'alive': n['Alive'], "
                "'resources': {k: v for k, v in n['Resources'].items() if not k.startswith('node:') "
                "and k not in ('memory', 'object_store_memory')}} for n in ray.nodes()]))")
        code = code.replace("print(json.dumps(", "print('PDSERVE_NODES', json.dumps(")
        out = self.exec_in(self.state().head.name, [sys.executable, "-c", code], timeout=60)
        # Ray may print warnings of its own (a node it is losing) on the same stdout.
        for line in out.stdout.splitlines():
            if line.startswith("PDSERVE_NODES "):
                return json.loads(line[len("PDSERVE_NODES "):])
        raise LabError(f"could not list the lab's Ray nodes: {out.stdout[-500:]}{out.stderr[-500:]}")

    # ------------------------------------------------------------------ deploy
    def deploy(self, config_path: str | Path, name: str, port: int) -> str:
        """Deploy config ``name`` (its router on ``port``) from inside the head host; return its URL."""
        state = self.state()
        copy = self.root / "configs" / f"{name}.yaml"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(config_path, copy)  # /tmp differs per host; the lab folder is seen by all
        argv = [str(Path(sys.executable).parent / "pdserve"), "serve", "--config", str(copy),
                "--address", state.ray_address, "--port", str(port), "--detach"]
        done = self.exec_in(state.head.name, argv, timeout=DEPLOY_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise LabError(f"deploying {config_path} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        url = f"http://{state.head.address}:{port}"
        state.deployed[name] = url
        self._save(state)
        return url

    # ------------------------------------------------------------------ inside a host
    def init_pid(self, name: str) -> Optional[int]:
        """PID (in this namespace) of the host's PID 1, or None when the host is down."""
        host = self.state().host(name)
        if host.init_pid is None:
            return None
        try:
            children = Path(f"/proc/{host.init_pid}/task/{host.init_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def exec_in(self, name: str, argv: list[str], *, timeout: float = 60, check: bool = True,
                **kw) -> subprocess.CompletedProcess:
        """Run a command inside host ``name``: its network, PID, UTS and mount namespaces."""
        pid = self.init_pid(name)
        if pid is None:
            raise LabError(f"lab host {name} is down")
        return run(["nsenter", "--target", str(pid), "--net", "--pid", "--uts", "--mount", "--", *argv],
                   timeout=timeout, check=check, env=self.env(), **kw)

    def interface_bytes(self, name: str) -> dict[str, int]:
        """Bytes host ``name`` received and sent on its interface, read off its bridge port."""
        stats = Path("/sys/class/net") / self.state().host(name).bridge_port / "statistics"
        # The bridge port's tx is what went into the host, its rx what came out.
        return {"rx": int((stats / "tx_bytes").read_text()), "tx": int((stats / "rx_bytes").read_text())}

    # ------------------------------------------------------------------ failures
    def kill_host(self, name: str) -> None:
        """Kill every process of the host at once, as a power cut would; its network stays."""
        require_root()
        state = self.state()
        host = state.host(name)
        if host.init_pid is not None:
            _kill(host.init_pid)
        _kill_netns_processes(host.netns)
        host.init_pid = None
        self._save(state)

    def start_host(self, name: str) -> None:
        """Start a killed host again: a fresh PID 1 and Ray node, which Ray Serve fills again."""
        require_root()
        state = self.state()
        host = state.host(name)
        if self.init_pid(name) is not None:
            raise LabError(f"lab host {name} is up")
        if host.head:
            raise LabError("the head host holds Ray's GCS: a lab whose head died must be made again "
                           "(`pdserve lab down`, then `up`)")
        # Ray may still count the killed node alive for a while: wait for a new node at its address.
        try:
            before = {n["node_id"] for n in self.ray_nodes() if n["address"] == host.address}
        except LabError:
            before = set()
        self._start_host(state, host)
        deadline = time.monotonic() + NODE_WAIT_S
        while time.monotonic() < deadline:
            try:
                nodes = self.ray_nodes()
            except LabError:
                nodes = []  # the GCS is busy noticing the old node's death: ask again
            if any(n["alive"] and n["address"] == host.address and n["node_id"] not in before for n in nodes):
                return
            time.sleep(1)
        raise LabError(f"lab host {name} did not join the Ray cluster again within {NODE_WAIT_S:.0f}s")

    def fault(self, a: str, b: Optional[str], fault: netfaults.LinkFault) -> None:
        state = self.state()
        netfaults.apply_fault(state.host(a).endpoint(), state.host(b).endpoint() if b else None, fault,
                              state_dir=self.faults_dir)

    def clear_faults(self, a: str, b: Optional[str] = None) -> None:
        state = self.state()
        netfaults.clear_faults(state.host(a).endpoint(), state.host(b).endpoint() if b else None,
                               state_dir=self.faults_dir)

    # ------------------------------------------------------------------ status, down
    def status(self) -> dict[str, Any]:
        state = self.state()
        hosts = [{"name": h.name, "address": h.address, "netns": h.netns, "head": h.head,
                  "up": self.init_pid(h.name) is not None, "cpus": h.cpus, "resources": h.resources}
                 for h in state.hosts]
        try:
            nodes = self.ray_nodes()
        except LabError as e:
            nodes = [{"error": str(e)}]
        faults = netfaults.active_faults(self.faults_dir) if self.faults_dir.is_dir() else []
        return {"hosts": hosts, "ray_address": state.ray_address, "ray_nodes": nodes, "routers": state.deployed,
                "network_faults": faults}

    def down(self) -> None:
        """Remove every namespace, bridge and process of the lab; also after a crash. Idempotent."""
        require_root()
        hosts: list[HostState] = []
        if self.exists():
            try:
                hosts = self.state().hosts
            except (ValueError, KeyError, TypeError):
                hosts = []
        for h in hosts:
            if self.faults_dir.is_dir():
                try:
                    netfaults.clear_faults(h.endpoint(), state_dir=self.faults_dir)
                except (LabError, ValueError, OSError):
                    pass  # its namespace may be gone already; the namespace's removal clears the rest
            if h.init_pid is not None:
                _kill(h.init_pid)
        names = set(_lab_namespaces()) | {h.netns for h in hosts}
        for ns in names:
            _kill_netns_processes(ns)
        for ns in names:
            run(["ip", "netns", "del", ns], check=False)
        for h in hosts:
            if _link_exists(h.bridge_port):
                run(["ip", "link", "del", h.bridge_port], check=False)
        if _link_exists(BRIDGE):
            run(["ip", "link", "del", BRIDGE], check=False)
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)


def _lab_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs in the namespace (a delayer, a process that escaped its host)."""
    for _ in range(20):
        pids = [int(p) for p in run(["ip", "netns", "pids", netns], check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            _kill(pid)
        time.sleep(0.1)


def _wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise LabError(f"Ray's head did not listen on {host}:{port} within {timeout_s:.0f}s")
