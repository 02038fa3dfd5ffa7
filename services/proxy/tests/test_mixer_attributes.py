"""The Mixer filter's attribute bags without a Mixer: the source attributes a sidecar forwards
(x-istio-attributes) and how the server sidecar takes them, a TCP connection's bag, Pilot's
metadata compiled, and a TCP connection that Mixer cannot be asked about (fail-open)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress

import pytest
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import struct_pb2

from istio.mixerclient.attributes import encode_plain
from istio.proxy import compile, mixer
from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    Listener,
    MixerFilter,
    Snapshot,
    TcpProxy,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.proxy.tls import PeerIdentity
from istio.proxy.wire import Message
from istio.proxy.xds import from_protobuf
from istio.testing.net import free_port

NODE = "sidecar~10.1.2.3~productpage-v1.default~default.svc.cluster.local"
PROXY_IP, APP_IP = "127.0.0.74", "127.0.0.75"


def test_a_sidecar_forwards_its_uid_and_ip_from_its_node_id() -> None:
    assert mixer.source_attributes(NODE) == {
        "source.uid": "kubernetes://productpage-v1.default",
        "source.ip": bytes([10, 1, 2, 3]),
    }
    value = mixer.forward_header(NODE).decode()
    assert mixer.forwarded_attributes(value) == mixer.source_attributes(NODE)
    # Not a node id: nothing to say.
    assert mixer.source_attributes("productpage") == {}
    assert mixer.forward_header("productpage") == b""


def test_the_server_sidecar_takes_source_attributes_but_never_source_user() -> None:
    claimed = encode_plain(
        {
            "source.uid": "kubernetes://a.default",
            "source.user": "spiffe://cluster.local/ns/x/sa/admin",
            "destination.service": "spoofed",
            "source.ip": bytes([10, 0, 0, 9]),
        }
    )
    value = base64.b64encode(claimed.SerializeToString())
    filter_ = MixerFilter("mixer:9091", True, {"destination.service": "reviews"})
    bag = mixer.request_attributes(
        filter_,
        (
            "GET",
            "/",
            "reviews",
            [(b"X-Istio-Attributes", value), (b"user-agent", b"curl")],
            "",
            "127.0.0.1",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            True,
            1_764_000_000_123_456_789,
        ),
    )
    assert bag["source.uid"] == "kubernetes://a.default"
    assert bag["source.ip"] == bytes([10, 0, 0, 9])  # the caller's own, not the peer's
    assert bag["source.user"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert bag["destination.service"] == "reviews"
    assert bag["request.headers"] == {"user-agent": "curl"}  # the header is not the app's
    assert bag["request.time"] == datetime.datetime(
        2025, 11, 24, 16, 0, 0, 123457, tzinfo=datetime.UTC
    )


@pytest.mark.parametrize("value", ["%%%", base64.b64encode(b"\xff\xff\xff").decode(), ""])
def test_a_header_that_does_not_decode_says_nothing(value: str) -> None:
    assert mixer.forwarded_attributes(value) == {}


@pytest.mark.parametrize(
    ("peer", "source_ip"),
    [
        ("10.0.0.7", bytes([10, 0, 0, 7])),
        ("::1", ipaddress.ip_address("::1").packed),
        ("", None),  # a Unix socket
        ("not-an-address", None),
    ],
)
def test_a_requests_source_ip_is_its_peers(peer: str, source_ip: bytes | None) -> None:
    filter_ = MixerFilter("mixer:9091", True, {"destination.service": "ratings"})
    for _ in range(2):  # the second from packed_ip's memory: the same answer
        record = ("GET", "/", "ratings:9080", [(b"host", b"ratings:9080")], "1", peer, "", False, 0)
        bag = mixer.request_attributes(filter_, record)
        assert bag.get("source.ip") == source_ip


def test_a_tcp_connections_bag() -> None:
    filter_ = MixerFilter(
        "mixer:9091", True, {"destination.service": "mongo", "destination.port": 27017}
    )
    plain = mixer.connection_attributes(filter_, (("10.0.0.7", 41000), "", False))
    assert plain == {
        "destination.service": "mongo",
        "destination.port": 27017,
        "context.protocol": "tcp",
        "connection.mtls": False,
        "source.ip": bytes([10, 0, 0, 7]),
        "source.port": 41000,
    }
    unix = mixer.connection_attributes(filter_, ("", "spiffe://x", True))
    assert "source.ip" not in unix
    assert unix["source.user"] == "spiffe://x"
    assert unix["connection.mtls"] is True


def _listener_metadata(fields: dict[str, object]) -> Message:
    """A listener with the istio metadata `fields`, as the proxy decodes it."""
    resource = listener_pb2.Listener(name="virtualOutbound")
    resource.address.socket_address.address = "0.0.0.0"
    resource.address.socket_address.port_value = 15001
    metadata = struct_pb2.Struct()
    metadata.update(fields)
    resource.metadata.filter_metadata["istio"].CopyFrom(metadata)
    return from_protobuf(resource)


def test_pilots_metadata_compiles() -> None:
    virtual = compile.listener(_listener_metadata({"mixer_forward_attributes": True}))
    assert virtual.forward_attributes
    assert virtual.mixer is None
    assert not compile.listener(_listener_metadata({})).forward_attributes
    inbound = compile.listener(
        _listener_metadata(
            {"mixer": {"address": "mixer:9091", "attributes": {"destination.ip": "10.0.0.5"}}}
        )
    )
    assert inbound.mixer is not None
    assert inbound.mixer.attributes == {"destination.ip": bytes([10, 0, 0, 5])}
    with pytest.raises(compile.CompileError, match=r"mixer attribute destination\.ip: 'x'"):
        compile.listener(
            _listener_metadata(
                {"mixer": {"address": "mixer:9091", "attributes": {"destination.ip": "x"}}}
            )
        )


def test_outbound_requests_carry_the_header_only_when_pilot_says_mixer_is_there() -> None:
    forwarding = Listener("virtual", "0.0.0.0", 15001, True, True, None, forward_attributes=True)
    plain = Listener("other", "0.0.0.0", 80, True, False, None)
    context = Context(node_id=NODE)
    context.apply(Snapshot(listeners={"other": plain}))
    assert context.istio_attributes == b""
    context.apply(Snapshot(listeners={"other": plain, "virtual": forwarding}))
    assert context.istio_attributes == mixer.forward_header(NODE)
    context.apply(Snapshot(listeners={"other": plain}))
    assert context.istio_attributes == b""
    nameless = Context()  # no node id (a test proxy): nothing to forward
    nameless.apply(Snapshot(listeners={"virtual": forwarding}))
    assert nameless.istio_attributes == b""


def test_a_tcp_report_counts_bytes_and_says_why_it_was_denied() -> None:
    reports: list[dict[str, object]] = []
    context = Context()
    session = mixer.TcpMixer(
        context,
        MixerFilter("127.0.0.1:1", True, {"destination.service": "mongo"}),
        ("10.0.0.7", 41000),
        PeerIdentity("spiffe://cluster.local/ns/default/sa/a", "00"),
    )
    session.mixers.client("127.0.0.1:1").report = reports.append  # type: ignore[method-assign]
    session.denial = mixer.CheckAnswer(7, "Not allowed")
    session.report(received=10, sent=25)
    (bag,) = reports
    assert bag["connection.received.bytes"] == bag["connection.received.bytes_total"] == 10
    assert bag["connection.sent.bytes"] == bag["connection.sent.bytes_total"] == 25
    assert isinstance(bag["connection.duration"], datetime.timedelta)
    assert (bag["check.error_code"], bag["check.error_message"]) == (7, "Not allowed")
    assert (bag["source.user"], bag["connection.mtls"]) == (
        "spiffe://cluster.local/ns/default/sa/a",
        True,
    )


async def test_a_tcp_connection_goes_on_when_mixer_cannot_be_asked() -> None:
    """Fail-open (0.2's network_fail_open): Mixer unreachable, the connection is spliced and
    the Report is attempted; with policy checks off, Mixer is not asked at all."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()
        writer.close()

    backend = await asyncio.start_server(echo, APP_IP, 0)
    backend_port = backend.sockets[0].getsockname()[1]
    nowhere = f"127.0.0.1:{free_port()}"
    ports = {"checked": free_port(PROXY_IP), "unchecked": free_port(PROXY_IP)}
    listeners = {
        name: Listener(
            name,
            PROXY_IP,
            port,
            True,
            False,
            TcpProxy(name, "echo"),
            inbound=True,
            mixer=MixerFilter(
                nowhere,
                name == "checked",
                {"destination.ip": ipaddress.ip_address(PROXY_IP).packed},
            ),
        )
        for name, port in ports.items()
    }
    snapshot = Snapshot(
        listeners=listeners,
        clusters={
            "echo": Cluster("echo", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, backend_port),))
        },
    )
    context = Context()
    context.apply(snapshot)
    manager = ListenerManager(context, PROXY_IP)
    await manager.apply(snapshot)
    try:
        for port in ports.values():
            reader, writer = await asyncio.open_connection(PROXY_IP, port)
            writer.write(b"ping")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b"ping"
            writer.close()
        (client,) = context.mixers.clients.values()
        assert (client.stats.checks, client.stats.transport_failures) == (1, 1)
    finally:
        await manager.close()
        if context.mixers is not None:
            await context.mixers.close()
        backend.close()
        await backend.wait_closed()


def test_requests_that_differ_only_in_id_and_time_share_the_rest_of_their_bag() -> None:
    reviews = MixerFilter("mixer:9091", True, {"destination.service": "reviews"})
    ratings = MixerFilter("mixer:9091", True, {"destination.service": "ratings"})
    headers = [(b"host", b"reviews:9080"), (b"cookie", b"a=1"), (b"Cookie", b"b=2")]
    first = mixer.request_attributes(
        reviews, ("GET", "/r/1", "reviews:9080", headers, "id-1", "10.0.0.7", "", False, 10**18)
    )
    second = mixer.request_attributes(
        reviews,
        ("GET", "/r/1", "reviews:9080", list(headers), "id-2", "10.0.0.7", "", False, 2 * 10**18),
    )
    assert (first["request.id"], second["request.id"]) == ("id-1", "id-2")
    assert first["request.time"] != second["request.time"]
    assert first["request.headers"] is second["request.headers"]
    assert first["request.headers"] == {"host": "reviews:9080", "cookie": "a=1,b=2"}
    # Another filter, another path, no id: nothing shared that should not be.
    other = mixer.request_attributes(
        ratings, ("GET", "/r/2", "reviews:9080", headers, "", "10.0.0.7", "", False, 10**18)
    )
    assert (other["destination.service"], other["request.path"]) == ("ratings", "/r/2")
    assert "request.id" not in other
    assert second["destination.service"] == "reviews"
