"""API keys to tenants: authentication (401), model permission (403), per-tenant cache salt.

Keys are kept only as SHA-256 digests; a presented key is hashed and looked up, so the
config and the router's memory never hold a usable key.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Mapping, Optional

from pdserve.admission.config import AuthSpec, BudgetSpec, TenantSpec, load_keys_file
from pdserve.admission.rejection import Rejection


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    priority_class: str
    weight: float
    budgets: BudgetSpec
    models: Optional[tuple[str, ...]]
    # vLLM's per-request cache_salt: prefix-cache blocks are only shared within a tenant,
    # so one tenant cannot learn by timing what another has cached. None: shared cache.
    cache_salt: Optional[str]

    @classmethod
    def from_spec(cls, spec: TenantSpec, salt_secret: Optional[str]) -> "Tenant":
        salt = None
        if salt_secret is not None:
            salt = hmac.new(salt_secret.encode(), spec.name.encode(), hashlib.sha256).hexdigest()[:32]
        return cls(spec.name, spec.priority_class, spec.weight, spec.budgets,
                   tuple(spec.models) if spec.models is not None else None, salt)


def presented_key(headers: Mapping[str, str]) -> Optional[str]:
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class TenantDirectory:
    def __init__(self, auth: AuthSpec, salt_secret: str) -> None:
        self.enabled = auth.enabled
        self.tenants = {t.name: Tenant.from_spec(t, salt_secret if auth.enabled else None) for t in auth.tenants}
        self.default = Tenant.from_spec(auth.default_tenant, None)
        self._by_digest: dict[str, str] = {}
        extra = load_keys_file(auth.keys_file, set(self.tenants)) if auth.keys_file else {}
        for t in auth.tenants:
            for d in t.key_sha256 + extra.get(t.name, []):
                self._by_digest[d] = t.name

    def all(self) -> list[Tenant]:
        return list(self.tenants.values()) if self.enabled else [self.default]

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        if not self.enabled:
            return self.default
        key = presented_key(headers)
        if not key:
            raise Rejection(401, "missing_key", "missing API key: send 'Authorization: Bearer <key>'")
        name = self._by_digest.get(hash_key(key))
        if name is None:
            raise Rejection(401, "invalid_key", "invalid API key")
        return self.tenants[name]

    @staticmethod
    def authorize_model(tenant: Tenant, model: str) -> None:
        if tenant.models is not None and model not in tenant.models:
            raise Rejection(403, "model_not_allowed", f"tenant {tenant.name!r} may not use model {model!r}",
                            param="model")
