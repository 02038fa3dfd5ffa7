from __future__ import annotations

import pytest

from istio.model import SpiffeId, spiffe_identity


def test_spiffe_identity_in_the_default_trust_domain() -> None:
    assert spiffe_identity("default", "bookinfo-reviews") == (
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    )


def test_spiffe_identity_in_another_trust_domain() -> None:
    assert spiffe_identity("books", "reviews", trust_domain="example.com") == (
        "spiffe://example.com/ns/books/sa/reviews"
    )


def test_spiffe_ids_round_trip_and_bad_ones_say_why() -> None:
    text = "spiffe://cluster.local/ns/default/sa/reviews"
    assert SpiffeId.parse(text) == SpiffeId("cluster.local", "default", "reviews")
    assert str(SpiffeId.parse(text)) == text
    with pytest.raises(ValueError, match="must start with spiffe://"):
        SpiffeId.parse("https://cluster.local/ns/a/sa/b")
    with pytest.raises(ValueError, match="not a workload identity"):
        SpiffeId.parse("spiffe://cluster.local/ns/a")
    with pytest.raises(ValueError, match="the trust domain 'Bad_Domain' is not a DNS name"):
        SpiffeId.parse("spiffe://Bad_Domain/ns/a/sa/b")
    with pytest.raises(ValueError, match="the service account '-b' is not a valid name"):
        SpiffeId.parse("spiffe://cluster.local/ns/a/sa/-b")


def test_an_identity_from_its_parts_names_the_bad_part() -> None:
    assert SpiffeId.of("vm", "mysql") == SpiffeId.parse("spiffe://cluster.local/ns/vm/sa/mysql")
    assert str(SpiffeId.of("vm", "mysql", "example.com")) == ("spiffe://example.com/ns/vm/sa/mysql")
    with pytest.raises(ValueError, match="the namespace 'a/b' is not a valid name"):
        SpiffeId.of("a/b", "mysql")
    with pytest.raises(ValueError, match="the service account '' is not a valid name"):
        SpiffeId.of("vm", "")
