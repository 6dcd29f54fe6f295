"""An engine step that runs no model waits for its KV pulls instead of spinning.

vLLM steps an engine whose only requests wait for remote KV about every millisecond; on a
one-core engine each of those steps takes the core and the GIL from the pull itself. The
worker's ``get_transfer_results`` on such a step waits (bounded) for a pull to end."""
from __future__ import annotations

import threading
import time

import torch

from pdserve.kv_transfer.grpc_scheduler import GrpcKVMetadata
from pdserve.kv_transfer.grpc_settings import GrpcKVSettings
from pdserve.kv_transfer.grpc_worker import IDLE_STEP_WAIT_S, GrpcKVWorker
from pdserve.kv_transfer.kv_puller import Pulled, PullJob

PULL_S = 0.3


def _worker(monkeypatch) -> tuple[GrpcKVWorker, threading.Event]:
    worker = GrpcKVWorker("engine-d", GrpcKVSettings(host="127.0.0.1", port=1), num_blocks=4,
                          is_producer=False, is_consumer=True)
    worker.register_kv_caches({"layer.0": torch.zeros(4, 2, 16, 8)})
    started = threading.Event()

    def slow_pull(job: PullJob) -> Pulled:
        started.set()
        time.sleep(PULL_S)
        return Pulled(nbytes=1024, same_host=False)

    monkeypatch.setattr(worker._puller, "pull", slow_pull)
    monkeypatch.setattr(worker._puller, "release", lambda job, ok: None)
    return worker, started


def _job() -> PullJob:
    return PullJob(request_id="req-1", remote_request_id="p-1", remote_engine_id="engine-p", host="127.0.0.1",
                   port=1, local_block_ids=[0, 1], first_remote_block=0)


def _steps_until_loaded(worker: GrpcKVWorker, runs_model: bool) -> int:
    """Steps the worker as vLLM would until the pull is reported; returns how many steps it took."""
    worker.start_load_kv(GrpcKVMetadata(pulls=[_job()], runs_model=runs_model))
    steps = 0
    while True:
        steps += 1
        results = worker.get_transfer_results()
        if "req-1" in results.finished_recving:
            assert not results.failed_recving
            return steps
        worker.start_load_kv(GrpcKVMetadata(runs_model=runs_model))


def test_a_step_without_model_work_waits_for_the_pull(monkeypatch):
    worker, _ = _worker(monkeypatch)
    try:
        t0 = time.monotonic()
        steps = _steps_until_loaded(worker, runs_model=False)
        elapsed = time.monotonic() - t0
    finally:
        worker.shutdown()
    # Every idle step but the last waits its full IDLE_STEP_WAIT_S (only the pull's end wakes it
    # early): ~30 steps for a 0.3 s pull, not thousands, however long the pull really took.
    assert steps <= elapsed / IDLE_STEP_WAIT_S + 2, (steps, elapsed)


def _count_waits(monkeypatch, worker: GrpcKVWorker) -> list[float]:
    waits: list[float] = []
    real = worker._pull_ended.wait
    monkeypatch.setattr(worker._pull_ended, "wait", lambda timeout=None: waits.append(timeout) or real(timeout))
    return waits


def test_a_step_that_runs_the_model_never_waits(monkeypatch):
    worker, started = _worker(monkeypatch)
    waits = _count_waits(monkeypatch, worker)
    try:
        worker.start_load_kv(GrpcKVMetadata(pulls=[_job()], runs_model=True))
        assert started.wait(5)
        for _ in range(20):  # twenty steps with the pull in flight
            worker.get_transfer_results()
            worker.start_load_kv(GrpcKVMetadata(runs_model=True))
        assert waits == []
        worker.start_load_kv(GrpcKVMetadata(runs_model=False))
        worker.get_transfer_results()
        assert waits == [IDLE_STEP_WAIT_S]  # the same pull, an idle step: it waits, bounded
    finally:
        worker.shutdown()


def test_an_idle_step_with_nothing_in_flight_returns_at_once(monkeypatch):
    worker, _ = _worker(monkeypatch)
    waits = _count_waits(monkeypatch, worker)
    try:
        for _ in range(20):
            worker.start_load_kv(GrpcKVMetadata(runs_model=False))
            worker.get_transfer_results()
        assert waits == []
    finally:
        worker.shutdown()
