"""The Mixer filter: Check before an inbound request goes to the app, Report after it ends.

Pilot puts `istio.mixer` (Mixer's address, whether policy checks are off, the destination's
attributes) in each inbound listener's metadata; the compiled listener carries it as
`MixerFilter`. For a request on such a listener the proxy builds the attribute bag Envoy's
Mixer filter built in 0.2 (request.*, source.*, destination.*, connection.mtls, and after the
response response.*), asks `MixerClient.check` (cached by referenced attributes, fail-open),
answers a denial itself, and queues the Report (batched). The gRPC calls ride the proxy's own
HTTP/2 client (istio.http2.grpc): no grpcio in the data plane. This module is imported only
when a listener has Mixer, so a mesh without Mixer pays nothing for it.

TCP (0.2's Envoy mixer TCP filter): a connection to an inbound TCP listener with Mixer is
checked before the upstream is even connected (`TcpMixer.check`; a denial closes it, not a
byte sent on), and reported once when it closes with its byte counts and duration.

Source attributes (0.2's forward_attributes): a sidecar whose Pilot says Mixer is there
(`mixer_forward_attributes` on the capture listener) adds `x-istio-attributes` to every
outbound request: base64 of an istio.mixer.v1.Attributes with its own source.uid
(`kubernetes://<pod>.<namespace>`, from its node id) and source.ip. The server sidecar merges
them into its bag (they name the caller better than the connection's peer, which may be a
loopback or NATed address) and strips the header before the app. They are not authenticated
(as in 0.2): source.user, the mTLS identity, is never taken from them.

Quotas: the metadata's `quota_specs` (the QuotaSpecs Pilot found bound to the destination)
say what each request is charged; Check asks for those (the client prefetches them), and a
quota not granted is answered 429 (RESOURCE_EXHAUSTED), as Envoy's Mixer filter did.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import ipaddress
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from istio.http2.grpc import Channel
from istio.mixerclient.attributes import DecodeError, encode_plain, read_plain
from istio.mixerclient.client import OK, CheckAnswer, MixerClient
from istio.proxy.config import MixerFilter

if TYPE_CHECKING:
    from istio.proxy.context import Context
    from istio.proxy.mixer_reports import ReporterProcess
    from istio.proxy.stats import Stats
    from istio.proxy.tls import PeerIdentity

log = logging.getLogger(__name__)

CHECK = "/istio.mixer.v1.Mixer/Check"
REPORT = "/istio.mixer.v1.Mixer/Report"
CALL_TIMEOUT = 5.0
ISTIO_ATTRIBUTES = b"x-istio-attributes"
_ALLOWED = CheckAnswer(OK)
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
    """The proxy's Mixer clients, one per address (a Check cache each), and where Reports go:
    with `reports="process"` to a reporter process (istio.proxy.mixer_reports: the bags,
    their batching and encoding on another core, off the request path), with "inline" into
    each client's own batch, on this loop (one process less: for a small host, and tests)."""

    def __init__(self, reports: str = "inline") -> None:
        if reports not in REPORT_MODES:
            raise ValueError(f"reports must be one of {', '.join(REPORT_MODES)}, not {reports!r}")
        self.clients: dict[str, MixerClient] = {}
        self.reports = reports
        self.reporter: ReporterProcess | None = None

    def client(self, address: str) -> MixerClient:
        found = self.clients.get(address)
        if found is None:
            found = self.clients[address] = MixerClient(GrpcTransport(address))
        return found

    def report_request(
        self,
        mixer: MixerFilter,
        record: RequestRecord,
        bag: Mapping[str, Any] | None,
        *,
        status: int,
        request_bytes: int,
        response_bytes: int,
        duration: float,
        time_ns: int,
        inline: bool = False,
    ) -> None:
        """Queue a finished request's Report (`time_ns`: when it ended); `bag` is its Check
        bag when one was made. To the reporter process when there is one that keeps up,
        unless `inline`."""
        if (
            not inline
            and self.reports == "process"
            and self._reporter().request(
                mixer, record, status, request_bytes, response_bytes, duration, time_ns
            )
        ):
            return
        self.client(mixer.address).report(
            report_attributes(
                request_attributes(mixer, record) if bag is None else bag,
                status=status,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                duration=duration,
                time_ns=time_ns,
            )
        )

    def report_connection(
        self,
        mixer: MixerFilter,
        record: ConnectionRecord,
        bag: Mapping[str, Any] | None,
        *,
        received: int,
        sent: int,
        duration: float,
        time_ns: int,
        denial_code: int,
        denial_message: str,
        inline: bool = False,
    ) -> None:
        """Queue a closed TCP connection's Report (`bag`: its Check bag, if made)."""
        if (
            not inline
            and self.reports == "process"
            and self._reporter().connection(
                mixer, record, received, sent, duration, time_ns, denial_code, denial_message
            )
        ):
            return
        self.client(mixer.address).report(
            connection_report_attributes(
                connection_attributes(mixer, record) if bag is None else bag,
                received=received,
                sent=sent,
                duration=duration,
                time_ns=time_ns,
                denial_code=denial_code,
                denial_message=denial_message,
            )
        )

    def collect(self, stats: Stats) -> None:
        """The counters of each client (`mixer.<address>.*`: its Checks, cache hits, calls to
        Mixer, failures, and the Reports this process sent) and of the reporter process
        (`mixer.reporter.*`: records it took, lost when it died, its restarts, and the
        Reports it sent)."""
        for address, client in self.clients.items():
            counted = client.stats
            stats.protocol_stats("mixer", address).counters.update(
                {
                    "check_total": counted.checks,
                    "check_cache_hits": counted.check_cache_hits,
                    "check_calls": counted.check_calls,
                    "check_refreshes": counted.check_refreshes,
                    "quota_pool_hits": counted.quota_pool_hits,
                    "transport_failures": counted.transport_failures,
                    "report_total": counted.reports_sent,
                    "report_records": counted.report_records,
                    "report_failures": counted.report_failures,
                }
            )
        reporter = self.reporter
        if reporter is not None:
            stats.protocol_stats("mixer", "reporter").counters.update(
                {
                    "records": reporter.records,
                    "records_lost": reporter.lost,
                    "restarts": reporter.restarts,
                    **reporter.totals(),  # what it sent: report_total, _records, _failures
                }
            )

    def _reporter(self) -> ReporterProcess:
        if self.reporter is None:
            from istio.proxy.mixer_reports import Reporter, ReporterProcess

            self.reporter = ReporterProcess(fallback=Reporter(self))
        return self.reporter

    async def close(self) -> None:
        """Send every queued Report (the reporter process's too) and close the channels."""
        if self.reporter is not None:
            await self.reporter.close()
        for client in self.clients.values():
            await client.close()
            transport = client.transport
            if isinstance(transport, GrpcTransport):
                await transport.channel.close()


REPORT_MODES = ("process", "inline")


def mixers(context: Context) -> Mixers:
    """The proxy's Mixer clients, made the first time a listener with Mixer needs one."""
    if context.mixers is None:
        context.mixers = Mixers(context.mixer_reports)
        context.stats.collectors.append(context.mixers.collect)
    found: Mixers = context.mixers
    return found


def source_attributes(node_id: str) -> dict[str, Any]:
    """What a sidecar says about itself to the server sidecar: 0.2's source.uid
    (`kubernetes://<pod>.<namespace>`) and source.ip, from its node id
    `<type>~<ip>~<pod>.<namespace>~<domain>`. Empty for an id not of that form."""
    parts = node_id.split("~")
    if len(parts) != 4 or not parts[2]:
        return {}
    found: dict[str, Any] = {"source.uid": f"kubernetes://{parts[2]}"}
    with contextlib.suppress(ValueError):
        found["source.ip"] = ipaddress.ip_address(parts[1]).packed
    return found


def forward_header(node_id: str) -> bytes:
    """The x-istio-attributes value outbound requests carry (b"" without attributes)."""
    attributes = source_attributes(node_id)
    if not attributes:
        return b""
    return base64.b64encode(encode_plain(attributes).SerializeToString())


def forwarded_attributes(value: str) -> dict[str, Any]:
    """The caller's source.* attributes from its x-istio-attributes; a header that does not
    decode is ignored (a plain client may send anything), and source.user is never taken
    (only mTLS says who the caller is)."""
    try:
        bag = read_plain(base64.b64decode(value, validate=True))
    except (binascii.Error, DecodeError):
        log.debug("ignoring an x-istio-attributes header that does not decode")
        return {}
    return {
        name: attribute
        for name, attribute in bag.items()
        if name.startswith("source.") and name != "source.user"
    }


# A request as its Mixer attributes are made from it, in plain values (they cross to the
# reporter process as they are, istio.proxy.mixer_reports): method, path, authority, the
# request's headers, x-request-id, the peer's address, source.user (the mTLS identity, or ""),
# whether the connection is mTLS, and the request's time (ns since the epoch).
RequestRecord = tuple[str, str, str, list[tuple[bytes, bytes]], str, str, str, bool, int]
# A TCP connection's: the peer (a (host, port, ...) tuple, or a Unix socket's path), source.user,
# whether it is mTLS.
ConnectionRecord = tuple[Any, str, bool]


def request_attributes(mixer: MixerFilter, record: RequestRecord) -> dict[str, Any]:
    """The bag Check sees (and Report starts from)."""
    method, path, authority, headers, request_id, peer, source_user, mtls, time_ns = record
    # Requests on a keep-alive connection, and from one client, mostly repeat all but their id
    # and time: the rest of the bag is made once and its values shared, which also lets a
    # Report's delta settle them by identity.
    key = (id(mixer), method, path, authority, tuple(headers), peer, source_user, mtls)
    found = _BASES.get(key)
    if found is None:
        if len(_BASES) >= BASES_KEPT:
            _BASES.clear()
        # (the filter is held with its base, so its id is not another's while the key lives)
        found = _BASES[key] = (mixer, _request_base(mixer, record))
    bag = found[1].copy()  # (faster than a {**base, ...} display)
    bag["request.time"] = _time(time_ns)
    if request_id:
        bag["request.id"] = request_id
    return bag


BASES_KEPT = 512
_BASES: dict[tuple[Any, ...], tuple[MixerFilter, dict[str, Any]]] = {}


def _request_base(mixer: MixerFilter, record: RequestRecord) -> dict[str, Any]:
    """A request's bag but for request.id and request.time."""
    method, path, authority, headers, _, peer, source_user, mtls, _ = record
    header_map: dict[str, str] = {}
    forwarded = ""
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "x-istio-attributes":  # the calling sidecar's, not the app's
            forwarded = text
            continue
        header_map[key] = f"{header_map[key]},{text}" if key in header_map else text
    bag: dict[str, Any] = {
        **mixer.attributes,
        "request.headers": header_map,
        "request.path": path,
        "request.host": authority,
        "request.method": method,
        "request.scheme": "http",
        "context.protocol": "http",
        "connection.mtls": mtls,
    }
    if "user-agent" in header_map:
        bag["request.useragent"] = header_map["user-agent"]
    if peer:
        packed = packed_ip(peer)
        if packed is not None:  # a Unix socket peer: no source.ip
            bag["source.ip"] = packed
    if forwarded:
        bag.update(forwarded_attributes(forwarded))
    if source_user:
        bag["source.user"] = source_user
    return bag


_from_timestamp, _UTC = datetime.datetime.fromtimestamp, datetime.UTC


def _time(time_ns: int) -> datetime.datetime:
    return _from_timestamp(time_ns / 1e9, _UTC)


@functools.lru_cache(maxsize=4096)
def packed_ip(text: str) -> bytes | None:
    """An address's 4 or 16 bytes (None if `text` is not one), remembered: every request on a
    connection, and most connections from a few callers, give the same peer, and parsing with
    ipaddress costs more than the rest of the request's bag."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


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
    time_ns: int,
) -> dict[str, Any]:
    """A request's Report: its Check bag and the response's attributes (`time_ns` is when the
    response ended)."""
    report = bag.copy() if type(bag) is dict else dict(bag)
    report["response.code"] = status
    report["response.size"] = response_bytes
    report["request.size"] = request_bytes
    report["response.duration"] = datetime.timedelta(seconds=duration)
    report["response.time"] = _time(time_ns)
    return report


def connection_attributes(mixer: MixerFilter, record: ConnectionRecord) -> dict[str, Any]:
    """The bag a TCP connection's Check sees (and its Report starts from), as 0.2's TCP
    filter made it: the destination's attributes from Pilot, source.ip and source.port of the
    peer, connection.mtls and source.user from mTLS, context.protocol "tcp"."""
    peer, source_user, mtls = record
    bag: dict[str, Any] = dict(mixer.attributes)
    bag["context.protocol"] = "tcp"
    bag["connection.mtls"] = mtls
    if isinstance(peer, tuple) and len(peer) >= 2:  # a Unix socket peer: no source.ip
        packed = packed_ip(str(peer[0]))
        if packed is not None:
            bag["source.ip"] = packed
            bag["source.port"] = int(peer[1])
    if source_user:
        bag["source.user"] = source_user
    return bag


def connection_report_attributes(
    bag: Mapping[str, Any],
    *,
    received: int,
    sent: int,
    duration: float,
    time_ns: int,
    denial_code: int,
    denial_message: str,
) -> dict[str, Any]:
    """A connection's one Report: `received` bytes from the client, `sent` to it (each total
    is also the count since the last Report, there being one), and the Check's denial."""
    report = dict(bag)
    report.update(
        {
            "connection.received.bytes": received,
            "connection.received.bytes_total": received,
            "connection.sent.bytes": sent,
            "connection.sent.bytes_total": sent,
            "connection.duration": datetime.timedelta(seconds=duration),
            "context.time": _time(time_ns),
        }
    )
    if denial_code:
        report["check.error_code"] = denial_code
        if denial_message:
            report["check.error_message"] = denial_message
    return report


class TcpMixer:
    """Mixer for one TCP connection: Check when it opens, one Report when it closes."""

    __slots__ = ("bag", "denial", "mixer", "mixers", "record", "started")

    def __init__(
        self,
        context: Context,
        mixer: MixerFilter,
        peer: Any,
        identity: PeerIdentity | None,
    ) -> None:
        self.mixers = mixers(context)
        self.mixer = mixer
        self.record: ConnectionRecord = (
            peer,
            identity.spiffe_id if identity is not None else "",
            identity is not None,
        )
        self.bag = connection_attributes(mixer, self.record)
        self.started = time.monotonic()
        self.denial: CheckAnswer | None = None

    async def check(self) -> CheckAnswer:
        """Mixer's answer (fail-open); allowed without asking when policy checks are off."""
        if not self.mixer.check:
            return _ALLOWED
        answer = await self.mixers.client(self.mixer.address).check(self.bag)
        if not answer.ok:
            self.denial = answer
        return answer

    def report(self, *, received: int, sent: int) -> None:
        """Queue the connection's Report: `received` bytes from the client, `sent` to it."""
        denial = self.denial
        self.mixers.report_connection(
            self.mixer,
            self.record,
            self.bag,
            received=received,
            sent=sent,
            duration=time.monotonic() - self.started,
            time_ns=time.time_ns(),
            denial_code=denial.status_code if denial is not None else 0,
            denial_message=denial.message if denial is not None else "",
        )
