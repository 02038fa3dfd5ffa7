"""SPIFFE workload identities: spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """ValueError, saying what is wrong, for anything but spiffe://TD/ns/NS/sa/SA."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not a SPIFFE id: it must start with spiffe://")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(
                f"{uri!r} is not a workload identity: use spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
            )
        if not _DNS_NAME.match(trust_domain):
            raise ValueError(f"{uri!r}: the trust domain {trust_domain!r} is not a DNS name")
        for segment in (parts[1], parts[3]):
            if not _SEGMENT.match(segment):
                raise ValueError(f"{uri!r}: {segment!r} is not a valid name")
        return cls(trust_domain, parts[1], parts[3])

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
