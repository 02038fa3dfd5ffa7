"""The istio.mixer.v1.Mixer gRPC service: Check and Report over the runtime.

The transport only decodes, calls the runtime and encodes: a malformed attribute bag is
answered INVALID_ARGUMENT and counted, never raised into grpc's machinery.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from istio.api.mixer.v1 import check_pb2, report_pb2
from istio.expr import MapBag, Reference
from istio.mixer.metrics import MixerMetrics
from istio.mixer.runtime import CheckOutcome, QuotaRequest, Runtime
from istio.mixerclient.attributes import DecodeError as BagError
from istio.mixerclient.attributes import WordTable, decode, decode_report

SERVICE = "istio.mixer.v1.Mixer"

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_EXACT = check_pb2.ReferencedAttributes.EXACT
_ABSENCE = check_pb2.ReferencedAttributes.ABSENCE


def referenced_attributes(
    references: Iterable[Reference], message: check_pb2.ReferencedAttributes
) -> None:
    """Fill `message` with what a Check looked at. Map keys always go in the message's words
    (negative indexes), so that map_key 0 can mean "the whole attribute"."""
    word = WordTable()
    keys: dict[str, int] = {}
    for reference in references:
        match = message.attribute_matches.add()
        match.name = word(reference.name)
        match.condition = _EXACT if reference.present else _ABSENCE
        if reference.key is not None:
            index = keys.get(reference.key)
            if index is None:
                word.words.append(reference.key)
                index = keys[reference.key] = -len(word.words)
            match.map_key = index
    message.words.extend(word.words)


# Serialized ReferencedAttributes by the references they hold: requests alike reference alike,
# so most Checks reuse bytes made once. Bounded: cleared when full.
_REFERENCED: dict[tuple[tuple[tuple[str, str | None], bool], ...], bytes] = {}
_REFERENCED_LIMIT = 4096


def _referenced_bytes(outcome: CheckOutcome) -> bytes:
    found = _REFERENCED.get(outcome.asked)
    if found is None:
        message = check_pb2.ReferencedAttributes()
        referenced_attributes(outcome.references, message)
        found = message.SerializeToString()
        if len(_REFERENCED) >= _REFERENCED_LIMIT:
            _REFERENCED.clear()
        _REFERENCED[outcome.asked] = found
    return found


def check_response(outcome: CheckOutcome) -> check_pb2.CheckResponse:
    response = check_pb2.CheckResponse()
    precondition = response.precondition
    precondition.status.code = outcome.status_code
    if outcome.message:
        precondition.status.message = outcome.message
    precondition.valid_duration.FromTimedelta(outcome.valid_duration)
    precondition.valid_use_count = outcome.valid_use_count
    referenced = _referenced_bytes(outcome)
    precondition.referenced_attributes.MergeFromString(referenced)
    for name, result in outcome.quotas.items():
        quota = response.quotas[name]
        quota.granted_amount = result.granted
        quota.valid_duration.FromTimedelta(result.valid_duration)
        quota.referenced_attributes.MergeFromString(referenced)
    return response


# Serialized CheckResponses by everything they say: a service's requests mostly get the same
# answer (same references, same grant), so most Checks reuse bytes made once. Bounded: cleared
# when full.
_RESPONSES: dict[tuple[Any, ...], bytes] = {}
_RESPONSES_LIMIT = 4096


def check_response_bytes(outcome: CheckOutcome) -> bytes:
    """check_response(outcome), serialized."""
    quotas = outcome.quotas
    key = (
        outcome.status_code,
        outcome.message,
        outcome.valid_duration,
        outcome.valid_use_count,
        outcome.asked,
        tuple((n, r.granted, r.valid_duration) for n, r in quotas.items()) if quotas else (),
    )
    found = _RESPONSES.get(key)
    if found is None:
        found = check_response(outcome).SerializeToString()
        if len(_RESPONSES) >= _RESPONSES_LIMIT:
            _RESPONSES.clear()
        _RESPONSES[key] = found
    return found


_EMPTY_REPORT_RESPONSE = report_pb2.ReportResponse().SerializeToString()


class MixerService:
    """Check and Report as grpc handlers of raw bytes: requests are parsed here, not by grpc,
    so bytes that are not a request are answered INVALID_ARGUMENT (and counted) instead of an
    UNKNOWN error and a logged traceback; responses go out as bytes made here (most Check
    answers are cached bytes, see check_response_bytes)."""

    def __init__(self, runtime: Runtime, metrics: MixerMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self._check_counters: dict[int, Any] = {}

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self.check),
                "Report": grpc.unary_unary_rpc_method_handler(self.report),
            },
        )

    async def _bad_request(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, message: str
    ) -> NoReturn:
        self.metrics.bad_requests.labels(method).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        raise AssertionError("context.abort returned")  # it raises

    async def check(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """A serialized CheckRequest in, a serialized CheckResponse out."""
        started = time.perf_counter()
        try:
            parsed = check_pb2.CheckRequest.FromString(request)
            attributes = decode(parsed.attributes, parsed.global_word_count, into=MapBag())
        except DecodeError as error:
            await self._bad_request(context, "Check", f"not a {_CHECK_REQUEST}: {error}")
        except BagError as error:
            await self._bad_request(context, "Check", f"attributes: {error}")
        asked = parsed.quotas
        quotas = (
            {name: QuotaRequest(asked[name].amount, asked[name].best_effort) for name in asked}
            if asked
            else None
        )
        outcome = await self.runtime.check(attributes, quotas, parsed.deduplication_id)
        response = check_response_bytes(outcome)
        counter = self._check_counters.get(outcome.status_code)
        if counter is None:
            name = _CODE_NAMES.get(outcome.status_code, str(outcome.status_code))
            counter = self._check_counters[outcome.status_code] = self.metrics.checks.labels(name)
        counter.inc()
        self.metrics.check_latency.observe(time.perf_counter() - started)
        return response

    async def report(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """A serialized ReportRequest in, a serialized (empty) ReportResponse out."""
        try:
            records = decode_report(report_pb2.ReportRequest.FromString(request), into=MapBag)
        except DecodeError as error:
            await self._bad_request(context, "Report", f"not a {_REPORT_REQUEST}: {error}")
        except BagError as error:
            await self._bad_request(context, "Report", f"attributes: {error}")
        self.metrics.reports.inc()
        self.metrics.report_records.inc(len(records))
        await self.runtime.report(records)
        return _EMPTY_REPORT_RESPONSE


_CHECK_REQUEST = check_pb2.CheckRequest.DESCRIPTOR.full_name
_REPORT_REQUEST = report_pb2.ReportRequest.DESCRIPTOR.full_name
