"""``KEY=VALUE`` overrides laid on a config's YAML before it is validated, as ``pdserve serve
--set``, ``pdserve demo --set`` and the benchmark arms take them: ``router.disaggregation=always``.

Keys are dotted paths into the YAML; values are read as YAML (numbers, lists, mappings, ``null``
for a setting's default). The result is validated as any config is, so an unknown key fails.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml


class OverrideError(ValueError):
    pass


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"router.disaggregation=adaptive"`` -> ``{"router": {"disaggregation": "adaptive"}}``."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise OverrideError(f"override {text!r} is not KEY=VALUE with a dotted KEY, e.g. router.disaggregation=always")
    try:
        value: Any = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise OverrideError(f"override {text!r}: the value is not YAML ({e})") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def layered(overrides: list[str]) -> dict[str, Any]:
    """All ``overrides`` as one mapping, later ones over earlier ones."""
    out: dict[str, Any] = {}
    for text in overrides:
        out = merge(out, parse_override(text))
    return out
