"""The istio.mixer.v1.Mixer gRPC service: Check and Report over the runtime.

The transport only decodes, calls the runtime and encodes: a malformed attribute bag is
answered INVALID_ARGUMENT and counted, never raised into grpc's machinery.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from istio.api.mixer.v1 import check_pb2, report_pb2, service_pb2_grpc
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


class MixerService(service_pb2_grpc.MixerServicer):
    def __init__(self, runtime: Runtime, metrics: MixerMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self._check_counters: dict[int, Any] = {}

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The service with requests parsed here, not by grpc: bytes that are not a request
        are answered INVALID_ARGUMENT (and counted) instead of an UNKNOWN error and a logged
        traceback."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._raw(check_pb2.CheckRequest, self.Check, "Check"),
                    response_serializer=check_pb2.CheckResponse.SerializeToString,
                ),
                "Report": grpc.unary_unary_rpc_method_handler(
                    self._raw(report_pb2.ReportRequest, self.Report, "Report"),
                    response_serializer=report_pb2.ReportResponse.SerializeToString,
                ),
            },
        )

    def _raw(
        self, message: type[Message], method: Callable[[Any, Any], Awaitable[Any]], name: str
    ) -> Callable[[bytes, Any], Awaitable[Any]]:
        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                parsed = message.FromString(request)
            except DecodeError as error:
                self.metrics.bad_requests.labels(name).inc()
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"not a {message.DESCRIPTOR.full_name}: {error}",
                )
            return await method(parsed, context)

        return call

    async def Check(
        self, request: check_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> check_pb2.CheckResponse:
        started = time.perf_counter()
        try:
            attributes = decode(request.attributes, request.global_word_count, into=MapBag())
        except BagError as error:
            self.metrics.bad_requests.labels("Check").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"attributes: {error}")
        asked = request.quotas
        quotas = {name: QuotaRequest(asked[name].amount, asked[name].best_effort) for name in asked}
        outcome = await self.runtime.check(attributes, quotas, request.deduplication_id)
        response = check_response(outcome)
        counter = self._check_counters.get(outcome.status_code)
        if counter is None:
            name = _CODE_NAMES.get(outcome.status_code, str(outcome.status_code))
            counter = self._check_counters[outcome.status_code] = self.metrics.checks.labels(name)
        counter.inc()
        self.metrics.check_latency.observe(time.perf_counter() - started)
        return response

    async def Report(
        self, request: report_pb2.ReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> report_pb2.ReportResponse:
        try:
            records = decode_report(request, into=MapBag)
        except BagError as error:
            self.metrics.bad_requests.labels("Report").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"attributes: {error}")
        self.metrics.reports.inc()
        self.metrics.report_records.inc(len(records))
        await self.runtime.report(records)
        return report_pb2.ReportResponse()
