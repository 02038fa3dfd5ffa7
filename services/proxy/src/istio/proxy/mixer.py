"""The Mixer filter: Check before an inbound request goes to the app, Report after it ends.

Pilot puts `istio.mixer` (Mixer's address, whether policy checks are off, the destination's
attributes) in each inbound listener's metadata; the compiled listener carries it as
`MixerFilter`. For a request on such a listener the proxy builds the attribute bag Envoy's
Mixer filter built in 0.2 (request.*, source.*, destination.*, connection.mtls, and after the
response response.*), asks `MixerClient.check` (cached by referenced attributes, fail-open),
answers a denial itself, and queues the Report (batched). The gRPC calls ride the proxy's own
HTTP/2 client (istio.http2.grpc): no grpcio in the data plane. This module is imported only
when a listener has Mixer, so a mesh without Mixer pays nothing for it.

Quotas: the metadata's `quota_specs` (the QuotaSpecs Pilot found bound to the destination)
say what each request is charged; Check asks for those (the client prefetches them), and a
quota not granted is answered 429 (RESOURCE_EXHAUSTED), as Envoy's Mixer filter did.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from istio.http2.grpc import Channel
from istio.mixerclient.client import CheckAnswer, MixerClient
from istio.proxy.config import MixerFilter

log = logging.getLogger(__name__)

CHECK = "/istio.mixer.v1.Mixer/Check"
REPORT = "/istio.mixer.v1.Mixer/Report"
CALL_TIMEOUT = 5.0
# google.rpc codes of a denial to the HTTP status the client gets (Envoy's mapping).
HTTP_STATUS = {
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    14: 503,  # UNAVAILABLE
    16: 401,  # UNAUTHENTICATED
}


class GrpcTransport:
    """MixerClient's transport over one h2c channel to Mixer."""

    def __init__(self, address: str) -> None:
        self.channel = Channel(address)

    async def check(self, request: bytes) -> bytes:
        return await self.channel.unary(CHECK, request, timeout=CALL_TIMEOUT)

    async def report(self, request: bytes) -> bytes:
        return await self.channel.unary(REPORT, request, timeout=CALL_TIMEOUT)


class Mixers:
    """One client (its cache and batch) per Mixer address."""

    def __init__(self) -> None:
        self.clients: dict[str, MixerClient] = {}

    def client(self, address: str) -> MixerClient:
        found = self.clients.get(address)
        if found is None:
            found = self.clients[address] = MixerClient(GrpcTransport(address))
        return found

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
            transport = client.transport
            if isinstance(transport, GrpcTransport):
                await transport.channel.close()


def request_attributes(
    mixer: MixerFilter,
    *,
    method: str,
    path: str,
    authority: str,
    headers: list[tuple[bytes, bytes]],
    request_id: str,
    peer: str,
    source_user: str,
    mtls: bool,
) -> dict[str, Any]:
    """The bag Check sees (and Report starts from)."""
    header_map: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        header_map[key] = f"{header_map[key]},{text}" if key in header_map else text
    bag: dict[str, Any] = dict(mixer.attributes)
    bag.update(
        {
            "request.headers": header_map,
            "request.path": path,
            "request.host": authority,
            "request.method": method,
            "request.scheme": "http",
            "request.time": datetime.datetime.now(datetime.UTC),
            "context.protocol": "http",
            "connection.mtls": mtls,
        }
    )
    if request_id:
        bag["request.id"] = request_id
    if "user-agent" in header_map:
        bag["request.useragent"] = header_map["user-agent"]
    if peer:
        with contextlib.suppress(ValueError):  # a Unix socket peer: no source.ip
            bag["source.ip"] = ipaddress.ip_address(peer).packed
    if source_user:
        bag["source.user"] = source_user
    return bag


def charged_quotas(mixer: MixerFilter, bag: Mapping[str, Any]) -> dict[str, int]:
    """What Check asks for this request: every quota of every bound QuotaSpec rule that
    applies (a quota several rules name is charged their sum)."""
    charged: dict[str, int] = {}
    for rule in mixer.quotas:
        if rule.applies(bag):
            for name, amount in rule.quotas:
                charged[name] = charged.get(name, 0) + amount
    return charged


def denial_status(answer: CheckAnswer) -> int:
    return HTTP_STATUS.get(answer.status_code, 403)


def report_attributes(
    bag: Mapping[str, Any],
    *,
    status: int,
    request_bytes: int,
    response_bytes: int,
    duration: float,
) -> dict[str, Any]:
    report = dict(bag)
    report.update(
        {
            "response.code": status,
            "response.size": response_bytes,
            "request.size": request_bytes,
            "response.duration": datetime.timedelta(seconds=duration),
            "response.time": datetime.datetime.now(datetime.UTC),
        }
    )
    return report
