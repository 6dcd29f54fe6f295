"""Ray Serve request router that sends a call to the replica the pdserve router chose.

Ray Serve's default router picks replicas itself (power of two choices). P/D needs the
pair chosen by pdserve's own selection pipeline, so every call to a pool carries a
``replica=<unique_id>`` keyword. If that replica has gone (died, scaled down), the
call goes to the least-queued live replica of the pool instead of waiting: for P/D any
prefill or decode replica can serve a leg, because the KV location travels in the
request's ``kv_transfer_params``.

Each instance also registers itself in ``POOL_VIEWS`` so the pdserve router (same
process) can list a pool's live replicas without a cluster manager of its own.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

POOL_VIEWS: Dict[str, "TargetedRequestRouter"] = {}

TARGET_KWARG = "replica"


class TargetedRequestRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        # Ray ships this class by value (cloudpickle), so a bare ``POOL_VIEWS`` here would
        # name a private copy; importing the module reaches the one the router reads.
        from pdserve.router import targeting

        targeting.POOL_VIEWS[self._deployment_id.name] = self

    def live_replica_ids(self) -> List[str]:
        return [rid.unique_id for rid in self.curr_replicas]

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        target = None
        if pending_request is not None:
            target = pending_request.kwargs.get(TARGET_KWARG)
        if target:
            for r in candidate_replicas:
                if r.replica_id.unique_id == target:
                    return [[r]]
        return [candidate_replicas]
