"""NIXL reads that outlive their deadline fail down NIXL's own failure path (no engine needed)."""
import time

from pdserve.kv_transfer.nixl_faults import _add_read_deadline


class _FakeWorker:
    """The parts of vLLM's NixlConnectorWorker the deadline wraps."""

    def __init__(self, releasable: bool = True) -> None:
        self._recving_transfers: dict[str, list[int]] = {}
        self._pdserve_failure_kind: dict[str, str] = {}
        self.releasable = releasable
        self.failed_calls: list[tuple[str, int]] = []

    def _read_blocks_for_req(self, req_id, meta):
        self._recving_transfers.setdefault(req_id, []).append(7)

    def _pop_done_transfers(self, transfers):
        return set(), set()  # every READ stays in flight, as behind a partition

    def _handle_failed_transfer(self, req_id, handle, failed_req_ids=None, record_failed_transfer=True):
        self.failed_calls.append((req_id, handle))
        failed_req_ids.add(req_id)
        return self.releasable


def test_a_read_past_its_deadline_fails_and_is_done():
    w = _FakeWorker()
    _add_read_deadline(w, 0.05)
    w._read_blocks_for_req("r1", None)
    assert w._pop_done_transfers(w._recving_transfers) == (set(), set())  # within the deadline
    time.sleep(0.08)
    done, failed = w._pop_done_transfers(w._recving_transfers)
    assert done == {"r1"} and failed == {"r1"}
    assert w._recving_transfers == {}
    assert w.failed_calls == [("r1", 7)]
    assert w._pdserve_failure_kind == {"r1": "deadline"}  # the kind the reporting wrapper pops


def test_a_handle_nixl_cannot_release_yet_is_kept_and_tried_again():
    w = _FakeWorker(releasable=False)
    _add_read_deadline(w, 0.01)
    w._read_blocks_for_req("r1", None)
    time.sleep(0.03)
    done, failed = w._pop_done_transfers(w._recving_transfers)
    assert done == set() and failed == {"r1"}
    assert w._recving_transfers == {"r1": [7]}


def test_other_transfer_maps_are_left_alone():
    w = _FakeWorker()
    _add_read_deadline(w, 0.01)
    other = {"s1": [3]}
    time.sleep(0.02)
    assert w._pop_done_transfers(other) == (set(), set())
    assert other == {"s1": [3]}
