"""The cross-host KV benchmark's pure parts (bench/lab_kv_transfer.py), without a lab or Ray:
header parsing, the derived configs, room on the lab's nodes, medians and ratios, the table,
and the raw-TCP sender and receiver over loopback."""
from __future__ import annotations

import ast
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from pdserve.bench import lab_kv_transfer as b
from pdserve.engine.tiny_model import BUILTIN_MODELS
from pdserve.settings.cluster import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]


def _raw(file: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / file).read_text())


def _derived(transport: str) -> dict:
    file, name, port, side = b.APPS[transport]
    return b.bench_config(_raw(file), name=name, port=port, side_channel_base_port=side)


# --- the response header and the options -------------------------------------------------------

def test_parse_kv_header():
    assert b.parse_kv_header("ok; ms=12.50; bytes=4194304; mode=inline") == {
        "status": "ok", "ms": 12.5, "bytes": 4194304, "mode": "inline"}
    assert b.parse_kv_header("ok; ms=0.75; bytes=10") == {"status": "ok", "ms": 0.75, "bytes": 10}
    assert b.parse_kv_header("failed; kind=checksum") == {"status": "failed", "kind": "checksum"}
    assert b.parse_kv_header(None) is None
    assert b.parse_kv_header("") is None


@pytest.mark.parametrize(("text", "ms"), [("1ms", 1.0), ("1", 1.0), ("0.5ms", 0.5), (" 2 ms", 2.0), (".25", 0.25)])
def test_parse_delay_ms(text, ms):
    assert b.parse_delay_ms(text) == ms


@pytest.mark.parametrize("text", ["1s", "ms", "", "-1ms", "fast"])
def test_parse_delay_ms_rejects(text):
    with pytest.raises(ValueError):
        b.parse_delay_ms(text)


def test_median():
    assert b.median([3.0, 1.0, 2.0]) == 2.0
    assert b.median([4, 1, 3, 2]) == 2.5
    assert b.median([]) is None
    assert b.median(x for x in [5]) == 5


# --- the derived configs -----------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_bench_config_switches_model_name_and_ports_only(transport):
    file, name, port, side = b.APPS[transport]
    raw = _raw(file)
    before = json.dumps(raw, sort_keys=True)
    cfg = b.bench_config(raw, name=name, port=port, side_channel_base_port=side)
    assert json.dumps(raw, sort_keys=True) == before  # the loaded config is not changed
    assert cfg["name"] == name and cfg["router"]["port"] == port
    assert cfg["model"]["path"] == "builtin:tiny-wide"
    assert cfg["kv_transfer"]["side_channel_base_port"] == side
    assert cfg["kv_transfer"]["transport"] == transport
    # everything else as in the lab config: hosts, pools, the model's served name
    assert cfg["lab"] == raw["lab"] and cfg["prefill"] == raw["prefill"] and cfg["decode"] == raw["decode"]
    assert cfg["model"]["served_name"] == raw["model"]["served_name"]
    valid = ClusterConfig.model_validate(cfg)  # what `pdserve serve` will load
    assert valid.model.max_model_len <= BUILTIN_MODELS["tiny-wide"]["max_position_embeddings"]
    assert valid.engine.max_num_batched_tokens >= valid.model.max_model_len
    # the YAML written for Lab.deploy reads back the same
    assert yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)) == cfg


def test_bench_apps_do_not_collide_with_each_other_or_the_lab_configs():
    apps = [_derived("nixl"), _derived("grpc")]
    labs = [_raw("cpu-lab-pd.yaml"), _raw("cpu-lab-pd-grpc.yaml")]
    assert len({c["name"] for c in apps + labs}) == 4
    assert len({c["router"]["port"] for c in apps + labs}) == 4
    # the shipped lab configs decide per request; the benchmark's apps move every prompt's KV
    assert {c["router"]["disaggregation"] for c in labs} == {"adaptive"}
    assert {ClusterConfig.model_validate(c).router.disaggregation for c in apps} == {"always"}
    # each engine takes side_channel_base_port + its index: ranges of (prefill + decode) ports
    ranges = []
    for c in apps + labs:
        base = c["kv_transfer"]["side_channel_base_port"]
        ranges.append(set(range(base, base + c["prefill"]["replicas"] + c["decode"]["replicas"])))
    assert sum(len(r) for r in ranges) == len(set().union(*ranges))


def test_host_of_pool():
    cfg = ClusterConfig.model_validate(_derived("nixl"))
    assert b.host_of_pool(cfg, "prefill") == "prefill"
    assert b.host_of_pool(cfg, "decode") == "decode"
    raw = _derived("nixl")
    raw["lab"]["hosts"][2]["resources"]["prefill_host"] = 1  # now two hosts offer it
    with pytest.raises(ValueError, match="2 lab hosts"):
        b.host_of_pool(ClusterConfig.model_validate(raw), "prefill")


def test_resource_needs_and_room():
    needs = b.resource_needs(ClusterConfig.model_validate(_derived("grpc")))
    assert needs == [{"CPU": 1.0, "prefill_host": 1}, {"CPU": 1.0, "decode_host": 1}, {"lab_head": 1}]
    both = needs + b.resource_needs(ClusterConfig.model_validate(_derived("nixl")))
    empty_lab = [{"lab_head": 4.0, "memory": 1e9}, {"CPU": 2.0, "prefill_host": 4.0}, {"CPU": 2.0, "decode_host": 4.0}]
    assert b.unplaceable(empty_lab, both) == []
    # the lab already serves one app: one core left on each engine host, room for one app only
    one_app = [{"lab_head": 3.0}, {"CPU": 1.0, "prefill_host": 3.0}, {"CPU": 1.0, "decode_host": 3.0}]
    assert b.unplaceable(one_app, needs) == []
    assert b.unplaceable(one_app, both) == [{"CPU": 1.0, "prefill_host": 1}, {"CPU": 1.0, "decode_host": 1}]
    # Ray leaves out a resource that is all taken
    need = {"CPU": 1.0, "prefill_host": 1}
    assert b.unplaceable([{"prefill_host": 2.0}], [need]) == [need]
    assert empty_lab[1]["CPU"] == 2.0  # the caller's figures are not changed


# --- rows, ratios, the table -------------------------------------------------------------------

def _sample(nbytes=64 * 1024 * 1024, seconds=0.1, **kw):
    s = {"prompt_tokens": 1626, "path": "pd", "header": {"status": "ok", "ms": seconds * 1000, "bytes": nbytes,
                                                         "mode": "inline"},
         "client_ms": 200.0, "pulls": 1, "bytes": nbytes, "seconds": seconds, "failures": 0}
    return {**s, **kw}


def test_summarize_medians_of_good_pulls():
    samples = [_sample(seconds=0.1), _sample(seconds=0.3, client_ms=400.0), _sample(seconds=0.2, client_ms=300.0)]
    r = b.summarize("grpc", "no fault", 1600, samples)
    assert r["samples"] == 3 and r["failed"] == 0 and r["not_inline"] == []
    assert r["p50_ms"] == pytest.approx(200.0)
    assert r["gb_s"] == pytest.approx(64 * 1024 * 1024 / 0.2 / 1e9)
    assert r["client_p50_ms"] == 300.0 and r["prompt_tokens"] == 1626 and r["bytes"] == 64 * 1024 * 1024


def test_summarize_counts_failures_and_uses_the_header_when_counters_lag():
    samples = [
        _sample(path="fallback", pulls=0, bytes=0, seconds=0.0),  # no P/D: not a pull
        _sample(failures=1, pulls=0, bytes=0, seconds=0.0, header={"status": "failed", "kind": "timeout"}),
        _sample(pulls=0, bytes=0, seconds=0.0, header={"status": "ok", "ms": 50.0, "bytes": 1000, "mode": "inline"}),
        _sample(pulls=1, bytes=0, seconds=0.0),  # counted, but moved nothing
    ]
    r = b.summarize("grpc", "no fault", 50, samples)
    assert r["samples"] == 1 and r["failed"] == 3
    assert r["p50_ms"] == pytest.approx(50.0) and r["bytes"] == 1000
    assert r["not_inline"] == ["failed"]  # a failed pull carries no mode


def test_summarize_adds_up_several_transfers_of_one_request():
    samples = [_sample(pulls=2, bytes=2000, seconds=0.002, header=None) for _ in range(3)]
    r = b.summarize("nixl", "no fault", 50, samples)
    assert r["samples"] == 3 and r["failed"] == 0 and r["transfers_per_request"] == 2
    assert r["bytes"] == 2000 and r["p50_ms"] == pytest.approx(2.0) and r["gb_s"] == pytest.approx(0.001)
    text = "\n".join(b.format_condition("no fault", {}, [r], []))
    assert "the counters saw 2 transfers per request" in text


def test_summarize_flags_grpc_that_is_not_inline_but_not_nixl():
    same_host = {"status": "ok", "ms": 1.0, "bytes": 10, "mode": "same-host"}
    r = b.summarize("grpc", "no fault", 50, [_sample(header=same_host), _sample(header=None), _sample()])
    assert sorted(r["not_inline"]) == ["no header", "same-host"]
    assert r["samples"] == 3  # the counters still give the figures
    n = b.summarize("nixl", "no fault", 50, [_sample(header=None)])
    assert n["not_inline"] == [] and n["samples"] == 1


def test_summarize_with_no_good_sample():
    r = b.summarize("nixl", "delay 1ms", 800, [_sample(path="fallback", pulls=0, header=None)])
    assert r["samples"] == 0 and r["failed"] == 1 and r["gb_s"] is None and r["p50_ms"] is None


def _row(transport, condition, words, gb_s, tokens=1626):
    return {"condition": condition, "transport": transport, "words": words, "prompt_tokens": tokens,
            "transfers_per_request": 1, "samples": 5, "failed": 0, "not_inline": [], "bytes": 50 * b.MiB,
            "p50_ms": 10.0, "gb_s": gb_s, "client_p50_ms": 100.0}


def test_compare_ratios_and_goal():
    rows = [_row("nixl", "no fault", 50, 2.0), _row("grpc", "no fault", 50, 1.8),
            _row("nixl", "no fault", 1600, 2.0), _row("grpc", "no fault", 1600, 1.5),
            _row("nixl", "rate 10gbit", 1600, 1.0), _row("grpc", "rate 10gbit", 1600, 0.9),
            _row("grpc", "delay 1ms", 1600, None)]
    q = b.compare(rows, {"no fault": 3.0, "rate 10gbit": 2.0, "delay 1ms": 0.5})
    assert [(x["condition"], x["words"]) for x in q] == [
        ("no fault", 50), ("no fault", 1600), ("rate 10gbit", 1600), ("delay 1ms", 1600)]
    assert q[0]["grpc_vs_nixl"] == pytest.approx(0.9) and q[0]["grpc_vs_tcp"] == pytest.approx(0.6)
    assert q[0]["nixl_vs_tcp"] == pytest.approx(2 / 3) and q[0]["goal_met"] is True
    assert q[1]["grpc_vs_nixl"] == pytest.approx(0.75) and q[1]["goal_met"] is False  # under 0.8x NIXL
    assert q[2]["grpc_vs_tcp"] == pytest.approx(0.45) and q[2]["goal_met"] is False  # under 0.5x TCP
    assert q[3]["grpc_vs_nixl"] is None and q[3]["goal_met"] is None  # nothing measured


def test_compare_goal_bounds_are_inclusive():
    q = b.compare([_row("nixl", "c", 50, 1.0), _row("grpc", "c", 50, 0.8)], {"c": 1.6})
    assert q[0]["goal_met"] is True


def test_format_condition():
    rows = [_row("nixl", "rate 10gbit", 1600, 1.0), _row("grpc", "rate 10gbit", 1600, 0.7)]
    rows[1]["not_inline"] = ["same-host"]
    rows[1]["failed"] = 2
    tcp = b.tcp_stats([{"bytes": 2_000_000_000, "seconds": 2.0}, {"bytes": 1_000_000_000, "seconds": 0.8},
                       {"bytes": 1_000_000_000, "seconds": 1.0}], 256)
    text = "\n".join(b.format_condition("rate 10gbit", tcp, rows, b.compare(rows, {"rate 10gbit": tcp["median_gb_s"]})))
    assert "== rate 10gbit" in text
    assert "raw TCP prefill->decode: 1.00 GB/s (median of 3 x 256 MiB; 1.00-1.25)" in text
    assert "NIXL READ alone" in text and "whole gRPC pull" in text
    assert "gRPC/NIXL  0.70x" in text and "gRPC/TCP  0.70x" in text and "MISSED" in text
    assert "2 request(s) without a successful pull" in text and "not mode=inline: ['same-host']" in text
    empty = "\n".join(b.format_condition("delay 1ms", {}, [_row("nixl", "delay 1ms", 50, None)], []))
    assert "raw TCP prefill->decode: - GB/s" in empty and "goal" not in empty


def test_tcp_stats():
    s = b.tcp_stats([{"bytes": 10**9, "seconds": 1.0}, {"bytes": 10**9, "seconds": 0.5}, {"bytes": 5, "seconds": 0}], 4)
    assert s == {"mib": 4, "gb_s": [1.0, 2.0], "median_gb_s": 1.5}


# --- the raw TCP stream, over loopback --------------------------------------------------------

def test_tcp_send_and_receive_over_loopback(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nbytes = 5 * b.MiB + 123  # not a whole number of sends
    receiver = threading.Thread(target=b.tcp_receive, args=("127.0.0.1", port, 3, 30.0))
    receiver.start()
    b.tcp_send("127.0.0.1", port, nbytes, 3, chunk=b.MiB)
    receiver.join(30)
    assert not receiver.is_alive()
    got = b.parse_json_lines("ray: noise\n" + capsys.readouterr().out)
    assert [g["bytes"] for g in got] == [nbytes] * 3
    assert all(g["seconds"] > 0 for g in got)


# --- import rules -------------------------------------------------------------------------------

def test_imports_nothing_of_cluster():
    tree = ast.parse((ROOT / "bench" / "lab_kv_transfer.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("pdserve.cluster")], names
    assert any(n.startswith("pdserve.lab") for n in names)


# --- the whole run against a fake lab and fake routers: the glue, in order ---------------------

class _Done:
    def __init__(self, stdout: str = "") -> None:
        self.stdout, self.returncode = stdout, 0


class _FakeLab:
    """Lab's surface as the benchmark uses it; records what it is asked."""

    def __init__(self, root: Path, free: list[dict]) -> None:
        self.faults_dir, self.free, self.calls, self.deployed = root / "faults", free, [], {}

    def exists(self):
        return True

    def state(self):
        addr = {"head": "10.77.0.2", "prefill": "10.77.0.3", "decode": "10.77.0.4"}
        host = lambda n: type("H", (), {"name": n, "address": addr[n]})()  # noqa: E731
        return type("S", (), {"head": host("head"), "deployed": self.deployed, "host": staticmethod(host)})()

    def deploy(self, path, name, port):
        self.calls.append(("deploy", name, port, yaml.safe_load(Path(path).read_text())))
        self.deployed[name] = url = f"http://10.77.0.2:{port}"
        return url

    def fault(self, a, b_, fault):
        self.calls.append(("fault", a, b_, fault))

    def clear_faults(self, a, b_=None):
        self.calls.append(("clear", a, b_))

    def down(self):
        self.calls.append(("down",))

    def exec_in(self, host, argv, *, timeout=60, check=True):
        code = argv[-1]
        if "tcp_receive" in code:
            self.calls.append(("tcp", host, code))
            return _Done("\n".join(json.dumps({"bytes": 256 * b.MiB, "seconds": 0.5}) for _ in range(5)))
        if "tcp_send" in code:
            return _Done()
        if "available_resources_per_node" in code:
            return _Done("some ray log line\n" + json.dumps(self.free))
        if "serve.delete" in code:
            self.calls.append(("delete", code.split("serve.delete(")[1].rstrip(")")))
            return _Done()
        raise AssertionError(code)


class _FakeClient:
    """Two routers: a completion moves prompt_tokens x 32 KiB; NIXL at 2 GB/s, gRPC at 1.8 GB/s."""

    def __init__(self, *a, **kw):
        self.totals = {8100: [0, 0, 0.0, 0], 8101: [0, 0, 0.0, 0]}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _resp(self, body, headers=None):
        return type("R", (), {"json": lambda s: body, "headers": headers or {}, "raise_for_status": lambda s: None})()

    def get(self, url, timeout=None):
        t = self.totals[int(url.split(":")[2].split("/")[0])]
        keys = ("kv_transfers_total", "kv_transfer_bytes_total", "kv_transfer_seconds_total",
                "kv_transfer_failures_total")
        return self._resp({"pools": {"decode": [dict(zip(keys, t))]}})

    def post(self, url, json=None):
        port = int(url.split(":")[2].split("/")[0])
        tokens = len(json["prompt"].split())
        nbytes, secs = tokens * 32 * 1024, tokens * 32 * 1024 / (2e9 if port == 8100 else 1.8e9)
        t = self.totals[port]
        t[0], t[1], t[2] = t[0] + 1, t[1] + nbytes, t[2] + secs
        headers = {"x-pdserve-path": "pd"}
        if port == 8101:
            headers["x-pdserve-kv-transfer"] = f"ok; ms={secs * 1000:.2f}; bytes={nbytes}; mode=inline"
        return self._resp({"usage": {"prompt_tokens": tokens}}, headers)


ROOMY = [{"lab_head": 4.0}, {"CPU": 2.0, "prefill_host": 4.0}, {"CPU": 2.0, "decode_host": 4.0}]


def test_main_against_a_fake_lab(tmp_path, monkeypatch, capsys):
    import httpx

    from pdserve.lab import hosts

    lab = _FakeLab(tmp_path, ROOMY)
    lab.deployed["pdlab-bench-grpc"] = "left by a kept run"
    monkeypatch.setattr(hosts, "Lab", lambda: lab)
    monkeypatch.setattr(hosts, "require_root", lambda: None)
    monkeypatch.setattr(httpx, "Client", _FakeClient)
    out_json = tmp_path / "r.json"
    assert b.main(["--words", "50,800", "--repeats", "3", "--delay", "1ms", "--json", str(out_json)]) == 0

    kinds = [c[0] for c in lab.calls]
    # the kept app goes first, then both deploys; each fault is cleared before the next one
    assert kinds[:3] == ["delete", "deploy", "deploy"]
    assert [c[1:3] for c in lab.calls if c[0] == "deploy"] == [("pdlab-bench-nixl", 8100), ("pdlab-bench-grpc", 8101)]
    cfgs = {c[1]: c[3] for c in lab.calls if c[0] == "deploy"}
    assert {c["model"]["path"] for c in cfgs.values()} == {"builtin:tiny-wide"}
    assert cfgs["pdlab-bench-grpc"]["kv_transfer"]["transport"] == "grpc"
    faults = [(c[0], c[3] if c[0] == "fault" else None) for c in lab.calls if c[0] in ("fault", "clear")]
    assert [f[0] for f in faults] == ["fault", "clear", "fault", "clear"]
    assert faults[0][1].rate == "10gbit" and faults[2][1].delay_ms == 1.0
    assert {c[1:3] for c in lab.calls if c[0] in ("fault", "clear")} == {("prefill", "decode")}
    assert [c[1] for c in lab.calls if c[0] == "tcp"] == ["decode"] * 3
    assert "tcp_receive('10.77.0.4', 19600, 5)" in lab.calls[[c[0] for c in lab.calls].index("tcp")][2]
    # a reused lab stays up; the benchmark's apps go
    assert ("down",) not in lab.calls and kinds[-2:] == ["delete", "delete"]

    text = capsys.readouterr().out
    assert "client: python -m pdserve.bench.lab_kv_transfer (this script)" in text
    assert "== no fault" in text and "== rate 10gbit" in text and "== delay 1ms" in text
    assert "raw TCP prefill->decode: 0.54 GB/s (median of 5 x 256 MiB" in text
    assert "gRPC/NIXL  0.90x" in text and "WARNING" not in text
    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == 3 * 2 * 2 and len(data["ratios"]) == 3 * 2
    assert all(q["grpc_vs_nixl"] == pytest.approx(0.9) for q in data["ratios"])
    assert all(r["samples"] == 3 for r in data["rows"])


def test_main_stops_before_deploying_when_the_lab_has_no_room(tmp_path, monkeypatch):
    from pdserve.lab import hosts

    full = [{"lab_head": 2.0}, {"prefill_host": 2.0}, {"decode_host": 2.0}]  # every core taken
    lab = _FakeLab(tmp_path, full)
    monkeypatch.setattr(hosts, "Lab", lambda: lab)
    monkeypatch.setattr(hosts, "require_root", lambda: None)
    with pytest.raises(SystemExit, match="no room"):
        b.main(["--json", str(tmp_path / "r.json")])
    assert not [c for c in lab.calls if c[0] in ("deploy", "fault")]


def test_main_keeps_measuring_after_a_condition_fails_and_deploys_when_ray_will_not_say(tmp_path, monkeypatch, capsys):
    import httpx

    from pdserve.lab import hosts
    from pdserve.lab.errors import LabError

    lab = _FakeLab(tmp_path, ROOMY)
    real_exec = lab.exec_in

    def exec_in(host, argv, **kw):
        if "available_resources_per_node" in argv[-1]:
            raise LabError("no such API")
        if "tcp_receive" in argv[-1] and any(c[0] == "fault" and c[3].rate for c in lab.calls[-1:]):
            raise LabError("receiver died")  # the rate condition's TCP stream
        return real_exec(host, argv, **kw)

    lab.exec_in = exec_in
    monkeypatch.setattr(hosts, "Lab", lambda: lab)
    monkeypatch.setattr(hosts, "require_root", lambda: None)
    monkeypatch.setattr(httpx, "Client", _FakeClient)
    assert b.main(["--words", "50", "--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["errors"] == ["rate 10gbit: LabError: receiver died"]
    assert sorted({r["condition"] for r in data["rows"]}) == ["delay 1ms", "no fault"]
    kinds = [c[0] for c in lab.calls if c[0] in ("fault", "clear")]
    assert kinds == ["fault", "clear", "fault", "clear"]  # the failed condition's fault is cleared too
    out = capsys.readouterr().out
    assert "deploying without the check" in out and "ERROR rate 10gbit" in out
