"""The cluster runtime the benchmarks start, wait for and stop clusters with, handed in from above.

bench/ sits below cluster/, the composition root that nothing imports (tests/test_import_contract.py
checks it): the runtime (cluster/runtime.py) comes in through ``use()``. ``pdserve ab`` and
``pdserve bench`` get it from cluster/cli.py's ``main``; each ``python -m pdserve.bench.<name>``
script from its own ``if __name__ == "__main__":`` block, the program's own composition root, which
nothing that imports the module runs.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol


class ClusterRuntime(Protocol):
    """What the benchmarks call; cluster/runtime.py (the module) is one."""

    def start_cluster(self, cfg: Any, port: Optional[int] = None, address: Optional[str] = None,
                      host: Optional[str] = None) -> str: ...

    def stop_cluster(self) -> None: ...

    def wait_ready(self, url: str, timeout_s: float = 600) -> None: ...

    def router_deployment_options(self, cfg: Any) -> dict[str, Any]: ...


_runtime: Optional[ClusterRuntime] = None


def use(runtime: ClusterRuntime) -> None:
    """Hand the benchmarks the runtime they start and stop clusters with."""
    global _runtime
    _runtime = runtime


def runtime() -> ClusterRuntime:
    if _runtime is None:
        raise RuntimeError("pdserve.bench was handed no cluster runtime: run it as `pdserve ...` or "
                           "`python -m pdserve.bench.<name>` (whose entry point hands it cluster/runtime.py)")
    return _runtime
