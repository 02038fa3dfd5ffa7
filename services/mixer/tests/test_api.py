"""The Check answer as bytes: made once per distinct outcome, equal to the message made each
time."""

from __future__ import annotations

from datetime import timedelta

from istio.api.mixer.v1 import check_pb2
from istio.mixer.api import check_response, check_response_bytes
from istio.mixer.runtime import CheckOutcome
from istio.mixersdk import QuotaResult

ASKED = ((("destination.service", None), True), (("source.labels", "version"), False))


def outcome(**changes: object) -> CheckOutcome:
    fields: dict[str, object] = {
        "status_code": 0,
        "message": "",
        "valid_duration": timedelta(seconds=10),
        "valid_use_count": 100,
        "asked": ASKED,
        "quotas": {"RequestCount": QuotaResult(1, timedelta(seconds=1))},
    }
    fields.update(changes)
    return CheckOutcome(**fields)  # type: ignore[arg-type]


def test_response_bytes_are_the_response_and_differ_with_every_field() -> None:
    variants = [
        outcome(),
        outcome(status_code=7, message="h:denied"),
        outcome(status_code=7, message="h:other"),
        outcome(valid_duration=timedelta(seconds=3)),
        outcome(valid_use_count=1),
        outcome(asked=ASKED[:1]),
        outcome(quotas={"RequestCount": QuotaResult(0, timedelta(seconds=1))}),
        outcome(quotas={"RequestCount": QuotaResult(1, timedelta(seconds=2))}),
        outcome(quotas={}),
    ]
    made = [check_response_bytes(v) for v in variants]
    assert len(set(made)) == len(variants)
    for variant, data in zip(variants, made, strict=True):
        assert check_pb2.CheckResponse.FromString(data) == check_response(variant)
        assert check_response_bytes(variant) is data  # the second time, from the cache
