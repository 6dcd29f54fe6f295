"""pdserve's Ray nodes run their workers (router, engine replicas, engines) at nice 0, where Ray's
default is 15 (lab/ray_internals.py): checked on the installed Ray, through cluster/runtime.py's
start_ray, in a fresh process so that no other test's Ray is touched."""
from __future__ import annotations

import os
import subprocess
import sys

from pdserve.lab.ray_internals import WORKER_NICENESS_ENV, node_env

PROBE = """
import os, ray
from pdserve.cluster.runtime import start_ray
start_ray(num_cpus=1)
@ray.remote(num_cpus=0)
def niceness():
    return os.getpriority(os.PRIO_PROCESS, 0)
print("NICE", ray.get(niceness.remote()), flush=True)
ray.shutdown()
"""


def _worker_niceness(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in out.stdout.splitlines() if line.startswith("NICE ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return int(lines[-1].split()[1])


def test_a_local_ray_started_by_pdserve_runs_its_workers_at_nice_0_and_an_operators_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != WORKER_NICENESS_ENV}
    assert _worker_niceness(env) == 0
    assert _worker_niceness({**env, WORKER_NICENESS_ENV: "7"}) == 7  # Ray's own knob, as the operator set it


def test_a_lab_nodes_environment_keeps_an_operators_niceness():
    assert node_env({})[WORKER_NICENESS_ENV] == "0"
    assert node_env({WORKER_NICENESS_ENV: "15", "X": "1"}) == {WORKER_NICENESS_ENV: "15", "X": "1"}
