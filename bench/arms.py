"""Benchmark arms: a shipped config with overrides, by name, for the cache sweep and ``pdserve ab``.

The four arms of the cache-aware routing comparison, all on the same two cores:

    mono-least-loaded   configs/cpu-monolithic.yaml as shipped (two full engines; least loaded)
    mono-cache-aware    the same, the monolithic pool picking by the prefix scorer against load
    pd-always           configs/cpu-pd.yaml, every request P/D, least-loaded pools
    pd-adaptive         configs/cpu-pd.yaml as shipped: router.disaggregation adaptive, prefix
                        scorer in both pools

Every engine runs vLLM's prefix cache in all four (pdserve's default, ``enable_prefix_caching``);
what differs is whether the router routes by it. The prefix scorer's weight is 2, the example
docs/configuration.md gives: a replica holding the whole prompt is worth two queued requests.

An arm may also be any config file, and overrides (``KEY=VALUE``, dotted keys, YAML values,
e.g. ``router.disaggregation=adaptive``) apply on top of either; the result is validated as a
config is at startup.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pdserve.settings.cluster import ClusterConfig
from pdserve.settings.overrides import OverrideError, merge, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PREFIX_WEIGHT = 2.0

_PREFIX = {"name": "prefix", "weight": PREFIX_WEIGHT}
_CACHE_AWARE_FULL = {"filters": ["healthy", "kv_headroom"], "scorers": [_PREFIX, "queue", "kv_usage"]}


@dataclass(frozen=True)
class ArmDef:
    name: str
    label: str
    config: str  # a file under configs/
    overrides: dict[str, Any] = field(default_factory=dict)


ARMS: dict[str, ArmDef] = {a.name: a for a in (
    ArmDef("mono-least-loaded", "monolithic least-loaded", "cpu-monolithic.yaml"),
    ArmDef("mono-cache-aware", "monolithic cache-aware", "cpu-monolithic.yaml",
           {"engine": {"enable_prefix_caching": True}, "router": {"selection": {"monolithic": _CACHE_AWARE_FULL}}}),
    # null: the pool's default pipeline (least loaded), in place of the shipped prefix scorer
    ArmDef("pd-always", "P/D always, least-loaded", "cpu-pd.yaml",
           {"router": {"disaggregation": "always", "selection": {"prefill": None, "decode": None}}}),
    ArmDef("pd-adaptive", "P/D adaptive + cache-aware", "cpu-pd.yaml"),  # as shipped
)}


class ArmError(ValueError):
    pass


class _PlainDumper(yaml.SafeDumper):
    """Writes a value met twice in full, not as a YAML anchor and alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def _yaml(data: Any, **kw) -> str:
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, **kw)


@dataclass
class Arm:
    name: str
    label: str
    config_path: str
    overrides: dict[str, Any]
    cfg: ClusterConfig
    text: str  # the config that runs, as YAML


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(CONFIGS.parent))
    except ValueError:
        return str(path)


def resolve(spec: str, overrides: Optional[list[str]] = None, name: Optional[str] = None) -> Arm:
    """An arm by name (``ARMS``) or config path, with ``overrides`` on top; ArmError when the name
    is unknown, the file is missing, or the config does not validate."""
    base = ARMS.get(spec)
    if base is not None:
        path, label, data_over = CONFIGS / base.config, base.label, base.overrides
    elif spec.endswith((".yaml", ".yml")) or "/" in spec:
        path, label, data_over = Path(spec), Path(spec).stem, {}
        if not path.is_file():
            raise ArmError(f"arm {spec!r}: config file not found")
    else:
        raise ArmError(f"unknown arm {spec!r}: give one of {', '.join(ARMS)}, or a config file path")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ArmError(f"arm {spec!r}: {path} is not a mapping")
    layered: dict[str, Any] = copy.deepcopy(data_over)
    try:
        for text in overrides or []:
            layered = merge(layered, parse_override(text))
    except OverrideError as e:
        raise ArmError(str(e)) from None
    merged = merge(data, layered)
    try:
        cfg = ClusterConfig.model_validate(merged)
    except Exception as e:  # noqa: BLE001  (a pydantic error, shown as is)
        raise ArmError(f"arm {spec!r} does not make a valid config: {e}") from None
    if overrides:
        label += " (" + ", ".join(overrides) + ")"
    head = f"# {shown(path)}" + (" with overrides:\n# " + _yaml(layered, default_flow_style=True, width=10**6)
                                 .strip() if layered else "") + "\n"
    return Arm(name or (spec if base else path.stem), label, shown(path), layered, cfg,
               head + _yaml(merged))
