"""Faults injected inside the KV transfer path, for chaos runs and tests.

The engine core runs in its own process, so the fault switch is a small JSON file
that the engine's replica writes and the transfer path re-reads when it changes:
no restart, no RPC into the engine loop. An absent file means no faults.

Spec keys (all optional): ``kill_links`` (bool: refuse every transfer), ``fail``
(fraction of transfers that fail), ``corrupt`` (fraction whose data is altered
after its checksum was taken), ``delay_s`` with ``delay_fraction`` (default 1.0),
``force_inline`` (bool, gRPC only: a same-host puller gets the bytes in the stream, as
across hosts, instead of by reference), ``drop_kv_params`` (bool, gRPC only: a prefill engine
finishes its leg and frees the blocks at once without handing off ``kv_transfer_params``, as a
prefill engine started without a working connector answers; the router must fall back).

Faults belong to one replica's run, never to whatever starts next from the same config:
the file lives in this user's private folder (``fault_dir``), its name carries the run id
of the replica that owns it (its Ray Serve replica id), and the engine removes it when it
starts and when it shuts down. A cluster stopped after ``pdserve chaos kill-links`` and
started again therefore starts healthy.
"""
from __future__ import annotations

import json
import os
import random
import re
import stat
import tempfile
import threading
from dataclasses import dataclass, fields
from typing import Any, Optional

_KEYS = {"kill_links", "fail", "corrupt", "delay_s", "delay_fraction", "force_inline", "drop_kv_params"}


@dataclass(frozen=True)
class FaultSpec:
    kill_links: bool = False
    fail: float = 0.0
    corrupt: float = 0.0
    delay_s: float = 0.0
    delay_fraction: float = 1.0
    force_inline: bool = False
    drop_kv_params: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FaultSpec":
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}; known: {sorted(_KEYS)}")
        spec = cls(**data)
        for name in ("fail", "corrupt", "delay_fraction"):
            value = getattr(spec, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault {name!r} must be a fraction in [0, 1], got {value!r}")
        if spec.delay_s < 0:
            raise ValueError("fault 'delay_s' must be >= 0")
        return spec

    def is_empty(self) -> bool:
        return self == FaultSpec()

    def active(self) -> dict[str, Any]:
        """The faults that differ from none, e.g. ``{"kill_links": True}`` (empty: no faults)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


def fault_dir() -> str:
    """This user's private folder of fault switches on this node, created 0700:
    ``$XDG_RUNTIME_DIR/pdserve-faults`` where that is set, else
    ``<tempdir>/pdserve-faults-<uid>``. Refuses a folder someone else could plant files in."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        path = os.path.join(runtime, "pdserve-faults")
    else:
        path = os.path.join(tempfile.gettempdir(), f"pdserve-faults-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Raises PermissionError unless ``path`` is a real directory of this user that nobody else may write."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"pdserve fault directory {path} is not a directory (a symlink or a file); "
                              "remove it, or set XDG_RUNTIME_DIR to a private folder")
    if st.st_uid != os.getuid():
        raise PermissionError(f"pdserve fault directory {path} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.getuid()}): another user could inject faults; remove it, or set "
                              "XDG_RUNTIME_DIR to a private folder")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"pdserve fault directory {path} is group- or world-writable "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): run chmod 700 on it, or remove it")


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))


def fault_file_path(cluster_name: str, role: str, index: int, run_id: str, folder: Optional[str] = None) -> str:
    """Where the fault switch of one engine's run lives on its node (``folder``: ``fault_dir()``)."""
    if not run_id:
        raise ValueError("a fault file needs the run id of the replica that owns it")
    name = "-".join(_name_part(p) for p in (cluster_name, role, index, run_id))
    return os.path.join(folder or fault_dir(), f"{name}.json")


def remove_faults(path: Optional[str]) -> None:
    """Deletes a fault file, if there is one."""
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def write_faults(path: str, spec: dict[str, Any] | None) -> FaultSpec:
    """Validates ``spec`` and makes it the current faults at ``path`` (None clears them)."""
    parsed = FaultSpec.from_dict(spec or {})
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if parsed.is_empty():
        remove_faults(path)
        return parsed
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)
    return parsed


class FaultSwitch:
    """Reads the fault file when its mtime changes; cheap enough to ask per transfer."""

    def __init__(self, path: str | None, rng: random.Random | None = None):
        self.path = path
        self._rng = rng or random.Random()
        self._stamp: tuple[int, int] | None = None
        self._spec = FaultSpec()
        self._lock = threading.Lock()

    def current(self) -> FaultSpec:
        if not self.path:
            return self._spec
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._spec = self._load() if stamp else FaultSpec()
            return self._spec

    def _load(self) -> FaultSpec:
        try:
            with open(self.path) as f:
                return FaultSpec.from_dict(json.load(f))
        except (OSError, ValueError):
            # A half-written or bad file must not take the transfer path down.
            return FaultSpec()

    def roll(self, fraction: float) -> bool:
        return fraction > 0 and self._rng.random() < fraction
