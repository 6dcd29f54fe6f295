"""Chaos state does not outlive its replica's run (kv_transfer/faults.py, engine/server.py).

A new user ran ``pdserve chaos kill-links``, stopped the cluster, started it again from the
same config, and every request fell back: the fault file sat at a predictable path in the
shared temp folder and the new engines read the stale ``kill_links``. Fault files now live in
a private per-user folder, are named for one replica's run, are removed when an engine starts
and stops, and every engine's load report (so /pdserve/status and ``pdserve status``) shows
the faults in force.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import stat
import threading

import pytest

from pdserve.bench.router_capacity import stub_cluster_config
from pdserve.cluster import cli
from pdserve.kv_transfer import faults
from pdserve.kv_transfer.faults import FaultSwitch, fault_dir, fault_file_path, write_faults
from pdserve.router.pools import Pool, ReplicaState


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run


def _engine(run_id: str, role: str = "prefill"):
    from pdserve.engine.server import EngineServer

    return EngineServer(stub_cluster_config("pd", stub_replicas=1), role, 0, run_id=run_id)


def test_the_fault_folder_is_private_to_the_user(runtime_dir):
    path = fault_dir()
    assert path == str(runtime_dir / "pdserve-faults")
    st = os.stat(path)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert os.path.dirname(fault_file_path("c", "prefill", 0, "run1")) == path


def test_without_xdg_runtime_dir_the_folder_is_per_uid_in_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(faults.tempfile, "gettempdir", lambda: str(tmp_path))
    assert fault_dir() == str(tmp_path / f"pdserve-faults-{os.getuid()}")
    assert stat.S_IMODE(os.stat(fault_dir()).st_mode) == 0o700


def test_a_shared_or_foreign_fault_folder_is_refused(runtime_dir, monkeypatch):
    folder = runtime_dir / "pdserve-faults"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(PermissionError, match="world-writable"):
        fault_dir()
    os.chmod(folder, 0o700)
    assert fault_dir() == str(folder)
    real_uid = os.getuid()
    monkeypatch.setattr(faults.os, "getuid", lambda: real_uid + 1)  # as if another user made it
    with pytest.raises(PermissionError, match="belongs to uid"):
        fault_dir()


def test_a_symlinked_fault_folder_is_refused(runtime_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, runtime_dir / "pdserve-faults")
    with pytest.raises(PermissionError, match="not a directory"):
        fault_dir()


def test_a_stale_fault_file_from_an_earlier_run_is_not_read_by_a_new_switch(runtime_dir):
    old = _engine("replica-of-the-first-cluster")
    old.set_kv_faults({"kill_links": True})  # pdserve chaos kill-links, then the cluster stopped
    assert FaultSwitch(old.fault_file).current().kill_links
    new = _engine("replica-of-the-second-cluster")  # same config name, role and index
    assert new.fault_file != old.fault_file
    assert FaultSwitch(new.fault_file).current().is_empty()
    assert "faults" not in new.load()


def test_the_engine_removes_its_fault_file_at_start_and_at_shutdown(runtime_dir, monkeypatch):
    import asyncio

    server = _engine("r1")
    write_faults(server.fault_file, {"fail": 0.5})

    class Stop(Exception):
        pass

    def stop_before_the_engine(self):
        raise Stop

    monkeypatch.setattr(type(server), "_set_env", stop_before_the_engine)
    with pytest.raises(Stop):
        asyncio.run(server.start())
    assert not os.path.exists(server.fault_file)
    server.set_kv_faults({"kill_links": True})
    asyncio.run(server.shutdown())
    assert not os.path.exists(server.fault_file)


def test_the_load_report_and_pool_status_carry_the_active_faults(runtime_dir):
    server = _engine("r2", role="decode")
    assert "faults" not in server.load()
    server.set_kv_faults({"fail": 0.25, "delay_s": 1.5})
    report = server.load()
    assert report["faults"] == {"fail": 0.25, "delay_s": 1.5}
    pool = Pool("decode", argparse.Namespace(deployment_name="decode"))
    pool.replicas["r2"] = ReplicaState("r2", load=report)
    assert pool.status()[0]["faults"] == {"fail": 0.25, "delay_s": 1.5}
    server.set_kv_faults(None)
    assert "faults" not in server.load()


STATUS = {"name": "pd", "mode": "pd", "transport": "grpc", "pools": {
    "prefill": [{"replica": "p0", "healthy": True, "running": 0, "waiting": 0, "kv_cache_usage": 0.0,
                 "inflight": 0, "cores": [0], "pid": 11, "faults": {"kill_links": True}}],
    "decode": [{"replica": "d0", "healthy": True, "running": 1, "waiting": 0, "kv_cache_usage": 0.1,
                "inflight": 1, "cores": [1], "pid": 12, "faults": None}]}}


def test_pdserve_status_prints_active_faults_per_replica(capsys):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(STATUS).encode()
            self.send_response(200 if self.path == "/pdserve/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc = cli._cmd_status(argparse.Namespace(url=f"http://127.0.0.1:{server.server_port}", config=None,
                                                json=False))
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("p0"))
    assert "ACTIVE FAULTS: kill_links=True" in lines[at + 1]
    assert out.count("ACTIVE FAULTS") == 1  # d0 has none


def test_every_engine_run_gets_its_own_fault_file_without_a_given_run_id(runtime_dir):
    from pdserve.engine.server import EngineServer

    cfg = stub_cluster_config("pd", stub_replicas=1)
    first, second = EngineServer(cfg, "prefill", 0), EngineServer(cfg, "prefill", 0)
    assert first.fault_file != second.fault_file
    assert os.path.dirname(first.fault_file) == fault_dir()
