"""The `lab` section of a config: which hosts the lab makes and what each offers Ray.

It imports nothing of pdserve, so the whole config (settings/cluster.py) can hold it.
"""
from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Host names become part of interface names, which Linux caps at 15 characters ("pdl-" + 11).
HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,10}")


class LabHostSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # The head host runs Ray's GCS and the router (pin the router there with router.ray_resources).
    head: bool = False
    # Logical CPUs the host's Ray node offers: what the replicas placed there ask for. The real
    # binding is each replica's core set (cpu_cores), as on one host.
    cpus: int = Field(0, ge=0)
    # Custom Ray resources of the host's node, which pools and the router ask for to land there.
    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not HOST_NAME.fullmatch(v):
            raise ValueError(f"lab host name {v!r}: 1-11 lowercase letters and digits, starting with a letter")
        return v


class LabSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The private bridge's network: the bridge takes its first address, the hosts the next ones
    # in their order here.
    subnet: str = "10.77.0.0/24"
    ray_port: int = Field(6379, ge=1024, le=65535)
    # Each host's Ray object store (its /dev/shm is a tmpfs of this size plus room).
    object_store_mb: int = Field(256, ge=80)
    hosts: list[LabHostSpec]

    @field_validator("subnet")
    @classmethod
    def _check_subnet(cls, v: str) -> str:
        net = ipaddress.IPv4Network(v, strict=True)
        if not net.is_private:
            raise ValueError(f"lab.subnet {v} is not a private network")
        return v

    @model_validator(mode="after")
    def _check_hosts(self):
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"lab.hosts: a name appears twice in {names}")
        heads = [h.name for h in self.hosts if h.head]
        if len(heads) != 1:
            raise ValueError(f"lab.hosts: exactly one host must be the head (head: true), got {heads or 'none'}")
        if len(self.hosts) + 1 > ipaddress.IPv4Network(self.subnet).num_addresses - 2:
            raise ValueError(f"lab.subnet {self.subnet} has too few addresses for {len(self.hosts)} hosts")
        return self

    @property
    def head(self) -> LabHostSpec:
        return next(h for h in self.hosts if h.head)

    def bridge_address(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet)[1])

    def address_of(self, name: str) -> str:
        index = [h.name for h in self.hosts].index(name)
        return str(ipaddress.IPv4Network(self.subnet)[2 + index])

    def prefix_len(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def offered_resources(self) -> set[str]:
        return {k for h in self.hosts for k in h.resources}
