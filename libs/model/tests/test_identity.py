from __future__ import annotations

from istio.model import spiffe_identity


def test_spiffe_identity_in_the_default_trust_domain() -> None:
    assert spiffe_identity("default", "bookinfo-reviews") == (
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    )


def test_spiffe_identity_in_another_trust_domain() -> None:
    assert spiffe_identity("books", "reviews", trust_domain="example.com") == (
        "spiffe://example.com/ns/books/sa/reviews"
    )
