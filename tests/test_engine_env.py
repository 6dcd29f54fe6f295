"""What an engine replica puts in its engine processes' environment before they start."""
import os
from pathlib import Path

import pytest

from pdserve.engine.server import EngineServer
from pdserve.settings.cluster import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _env_after_set(cfg) -> dict:
    """The environment _set_env leaves; this process's own environment is put back whole after
    (a key _set_env added must not leak into later tests, or into engines they start)."""
    saved = dict(os.environ)
    for key in ("PDSERVE_CPU_NO_AMX", "PDSERVE_MQ_NO_SPIN", "VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_HOST_IP"):
        os.environ.pop(key, None)
    try:
        EngineServer(cfg, "decode", 0, host="10.77.0.4")._set_env()
        return dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_cpu_engines_run_attention_without_amx_by_default():
    env = _env_after_set(load_config(CONFIGS / "cpu-pd.yaml"))
    assert env["PDSERVE_CPU_NO_AMX"] == "1"
    assert env["PDSERVE_MQ_NO_SPIN"] == "1"
    assert "child_guard" in env["PYTHONPATH"]  # where the switch is read


def test_amx_attention_can_be_turned_back_on():
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"cpu_amx_attention": True})})
    assert _env_after_set(cfg)["PDSERVE_CPU_NO_AMX"] == "0"


def test_the_switch_hides_amx_from_vllms_isa_probe():
    import subprocess
    import sys

    guard = Path(__file__).resolve().parents[1] / "engine" / "child_guard"
    probe = "import torch; print(torch.cpu._is_amx_tile_supported())"
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(guard),
                         PDSERVE_CPU_NO_AMX="1"), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


_SPIN_PROBE = """
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
ctx = zmq.Context()
reader = SpinCondition(is_reader=True, context=ctx, notify_address="inproc://r")
writer = SpinCondition(is_reader=False, context=ctx, notify_address="inproc://w")
print(reader.busy_loop_s, writer.busy_loop_s)
import threading, time
reader.last_read = time.monotonic() - 10  # past any busy loop: the reader sleeps on its socket
done = threading.Event()
threading.Thread(target=lambda: (reader.wait(None), done.set()), daemon=True).start()
# No writer ever notifies: vLLM's own reader would sleep for good; ours wakes to look again.
print("woke" if done.wait(3) else "asleep")
if reader.busy_loop_s == 0:  # how often a reader looks in half a second: just active, then idle
    def looks(active):
        n, t = 0, time.monotonic()
        while time.monotonic() - t < 0.5:
            reader.last_read = time.monotonic() if active else t - 10
            reader.wait(None)
            n += 1
        return n
    print(looks(True), looks(False))
"""


@pytest.mark.parametrize("switch, reader_spin_s, lost_wakeup", [("1", "0", "woke"), ("0", "1", "asleep")])
def test_the_switch_stops_vllms_queue_readers_spinning(switch, reader_spin_s, lost_wakeup):
    import subprocess
    import sys

    guard = Path(__file__).resolve().parents[1] / "engine" / "child_guard"
    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env=dict(os.environ, PYTHONPATH=str(guard),
                         PDSERVE_MQ_NO_SPIN=switch), capture_output=True, text=True, timeout=120)
    # a sleeping reader looks again within a few milliseconds even if a notification is lost
    assert out.stdout.split()[:3] == [reader_spin_s, "0", lost_wakeup], out.stderr[-2000:]
    if switch == "1":
        # a reader idle for a second looks every 10 ms (at most 50 times in 0.5 s), not every 2
        active, idle = map(int, out.stdout.split()[3:])
        assert idle <= 51 and active > idle, out.stdout


def test_engines_use_the_replicas_advertised_address():
    env = _env_after_set(load_config(CONFIGS / "cpu-pd.yaml"))
    assert env["VLLM_HOST_IP"] == "10.77.0.4"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.77.0.4"
