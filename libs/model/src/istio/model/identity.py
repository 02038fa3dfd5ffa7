"""Workload identities: what a workload presents, and its callers verify, under mutual TLS.

SPIFFE ids of the form spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>: Pilot puts
them in clusters as the names to verify, the CA signs them into certificates, join tokens name
the one identity they grant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PREFIX = "spiffe://"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """ValueError, saying what is wrong, for anything but spiffe://TD/ns/NS/sa/SA."""
        if not uri.startswith(_PREFIX):
            raise ValueError(f"{uri!r} is not a SPIFFE id: it must start with spiffe://")
        trust_domain, _, path = uri[len(_PREFIX) :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(
                f"{uri!r} is not a workload identity: use spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
            )
        try:
            return cls.of(parts[1], parts[3], trust_domain)
        except ValueError as error:
            raise ValueError(f"{uri!r}: {error}") from None

    @classmethod
    def of(
        cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> SpiffeId:
        """The identity of `service_account` in `namespace`; ValueError naming the bad part."""
        if not _DNS_NAME.match(trust_domain):
            raise ValueError(f"the trust domain {trust_domain!r} is not a DNS name")
        for what, name in (("namespace", namespace), ("service account", service_account)):
            if not _SEGMENT.match(name):
                raise ValueError(f"the {what} {name!r} is not a valid name")
        return cls(trust_domain, namespace, service_account)

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def spiffe_identity(
    namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> str:
    """The SPIFFE identity of a workload running as `service_account` in `namespace`:
    default, reviews -> spiffe://cluster.local/ns/default/sa/reviews

    Unchecked: registries pass on what the platform said, and the CA checks what it signs."""
    return str(SpiffeId(trust_domain, namespace, service_account))
