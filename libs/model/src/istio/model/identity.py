"""Workload identities: what a workload presents, and its callers verify, under mutual TLS."""

from __future__ import annotations

DEFAULT_TRUST_DOMAIN = "cluster.local"


def spiffe_identity(
    namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> str:
    """The SPIFFE identity of a workload running as `service_account` in `namespace`:
    default, reviews -> spiffe://cluster.local/ns/default/sa/reviews"""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
