"""The connection codec in memory: every frame type, stream states, flow control with
backpressure, and each protection against a bad peer (the right GOAWAY or RST_STREAM)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest

from istio.http2 import (
    PREFACE,
    ConnectionTerminated,
    Data,
    ErrorCode,
    H2Connection,
    H2Error,
    HeadersReceived,
    Informational,
    Limits,
    PingAcked,
    PingReceived,
    Settings,
    SettingsAcked,
    SettingsChanged,
    StreamClosedError,
    StreamReset,
    TooManyStreamsError,
    Trailers,
    WindowUpdated,
)
from istio.http2.hpack import Encoder

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/up"), (b":authority", b"x")]
OK = [(b":status", b"200")]

Frame = tuple[int, int, int, bytes]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def parse(data: bytes) -> list[Frame]:
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        kind, flags = data[3], data[4]
        stream_id = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream_id, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def setting(key: int, value: int) -> bytes:
    return struct.pack(">HL", key, value)


def server(**kwargs: object) -> H2Connection:
    """A server past the handshake: the client preface and an empty SETTINGS received."""
    conn = H2Connection(client=False, **kwargs)  # type: ignore[arg-type]
    conn.initiate()
    events = conn.receive(PREFACE + frame(SETTINGS, 0, 0))
    assert events == [SettingsChanged({})]
    conn.data_to_send()
    return conn


def goaway(conn: H2Connection) -> tuple[int, int, bytes]:
    """(error code, last stream id, debug data) of the GOAWAY the codec sent."""
    sent = [f for f in parse(conn.data_to_send()) if f[0] == GOAWAY]
    assert len(sent) == 1, sent
    payload = sent[0][3]
    return (
        int.from_bytes(payload[4:8], "big"),
        int.from_bytes(payload[:4], "big"),
        payload[8:],
    )


def resets(data: bytes) -> dict[int, int]:
    return {f[2]: int.from_bytes(f[3], "big") for f in parse(data) if f[0] == RST_STREAM}


def pump(a: H2Connection, b: H2Connection) -> list[object]:
    return list(b.receive(a.data_to_send()))


def pair(**server_kwargs: object) -> tuple[H2Connection, H2Connection]:
    client = H2Connection(client=True)
    srv = H2Connection(client=False, **server_kwargs)  # type: ignore[arg-type]
    client.initiate()
    srv.initiate()
    pump(client, srv)
    pump(srv, client)
    pump(client, srv)
    return client, srv


def of(kind: type, events: Iterable[object]) -> list[object]:
    return [e for e in events if type(e) is kind]


# -- the handshake and a whole exchange ----------------------------------------------------


def test_preface_and_settings_exchange() -> None:
    client = H2Connection(client=True, settings=Settings(max_concurrent_streams=7))
    client.initiate()
    sent = client.data_to_send()
    assert sent.startswith(PREFACE)
    frames = parse(sent[len(PREFACE) :])
    assert frames[0][0] == SETTINGS
    assert setting(2, 0) in frames[0][3]  # push disabled
    assert setting(3, 7) in frames[0][3]
    assert frames[1] == (WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 20) - 65535))
    srv = H2Connection(client=False)
    srv.initiate()
    events = srv.receive(sent)
    assert events[0] == SettingsChanged({3: 7, 2: 0, 6: 65536})
    assert of(WindowUpdated, events) == [WindowUpdated(0, (1 << 20) - 65535)]
    assert srv.send_window == 1 << 20
    reply = parse(srv.data_to_send())
    assert reply[0][0] == SETTINGS
    assert (SETTINGS, ACK, 0, b"") in reply
    assert of(SettingsAcked, client.receive(frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0)))


def test_request_response_with_trailers_round_trip() -> None:
    client, srv = pair()
    stream_id = client.send_request(POST)
    assert stream_id == 1
    client.send_data(stream_id, b"hello ")
    client.send_data(stream_id, b"world", end_stream=True)
    events = pump(client, srv)
    assert events[0] == HeadersReceived(1, POST, False)
    assert [e.data for e in of(Data, events)] == [b"hello ", b"world"]  # type: ignore[attr-defined]
    assert events[-1].end_stream  # type: ignore[attr-defined]
    srv.send_headers(1, [(b":status", b"100")])
    srv.send_headers(1, [*OK, (b"content-type", b"text/plain")])
    srv.send_data(1, b"answer")
    srv.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
    events = pump(srv, client)
    assert events == [
        Informational(1, [(b":status", b"100")]),
        HeadersReceived(1, [*OK, (b"content-type", b"text/plain")], False),
        Data(1, b"answer", False, 6),
        Trailers(1, [(b"x-checksum", b"abc")]),
    ]
    assert client.streams == {}
    assert srv.streams == {}
    assert client.next_stream_id == 3


def test_large_header_blocks_use_continuation_both_ways() -> None:
    client, srv = pair()
    big = [*REQUEST, *((f"x-h{i}".encode(), b"v" * 1000) for i in range(40))]
    stream_id = client.send_request(big, end_stream=True)
    sent = client.data_to_send()
    kinds = [f[0] for f in parse(sent)]
    assert kinds[0] == HEADERS
    assert kinds.count(CONTINUATION) >= 2
    assert srv.receive(sent) == [HeadersReceived(stream_id, big, True)]


def test_padding_and_priority_are_accepted_and_ignored() -> None:
    srv = server()
    block = Encoder().encode(REQUEST)
    padded = bytes([3]) + struct.pack(">LB", 0, 15) + block + b"\0\0\0"
    events = srv.receive(frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, padded))
    assert events == [HeadersReceived(1, REQUEST, False)]
    events = srv.receive(
        frame(PRIORITY, 0, 1, struct.pack(">LB", 0, 1))
        + frame(DATA, PADDED | END_STREAM, 1, bytes([4]) + b"body" + b"\0" * 4)
    )
    assert events == [Data(1, b"body", True, 4)]
    # the padding counts as consumed at once; the body only when the caller says so
    assert srv.recv_window == (1 << 20) - 9
    assert srv.unacknowledged == 5
    srv.acknowledge(1, 4)
    assert srv.unacknowledged == 9


def test_ping_is_answered_and_acks_reported() -> None:
    srv = server()
    events = srv.receive(frame(PING, 0, 0, b"12345678"))
    assert events == [PingReceived(b"12345678")]
    assert parse(srv.data_to_send()) == [(PING, ACK, 0, b"12345678")]
    srv.ping(b"abcdefgh")
    assert parse(srv.data_to_send()) == [(PING, 0, 0, b"abcdefgh")]
    assert srv.receive(frame(PING, ACK, 0, b"abcdefgh")) == [PingAcked(b"abcdefgh")]


def test_unknown_frame_types_are_ignored() -> None:
    srv = server()
    assert srv.receive(frame(0xFA, 0xFF, 1, b"whatever")) == []
    assert not srv.closed


def test_frames_split_across_reads() -> None:
    client, srv = pair()
    client.send_request(POST)
    client.send_data(1, b"x" * 1000, end_stream=True)
    data = client.data_to_send()
    events: list[object] = []
    for i in range(len(data)):
        events += srv.receive(data[i : i + 1])
    assert events[0] == HeadersReceived(1, POST, False)
    assert b"".join(e.data for e in of(Data, events)) == b"x" * 1000  # type: ignore[attr-defined]


# -- flow control --------------------------------------------------------------------------


def test_send_waits_for_credit_and_trailers_wait_behind_data() -> None:
    client, srv = pair()
    stream_id = client.send_request(POST)
    client.send_data(stream_id, b"a" * 100_000)
    client.send_headers(stream_id, [(b"x-t", b"1")], end_stream=True)
    assert client.pending(stream_id) == 100_000 - 65535
    events = pump(client, srv)
    received = sum(len(e.data) for e in of(Data, events))  # type: ignore[attr-defined]
    assert received == 65535
    assert not of(Trailers, events)
    # No credit goes back until the server's caller has consumed the data.
    assert parse(srv.data_to_send()) == []
    srv.acknowledge(stream_id, 40_000)
    updates = parse(srv.data_to_send())
    assert (WINDOW_UPDATE, 0, stream_id, struct.pack(">L", 40_000)) in updates
    events = client.receive(b"".join(frame(*f) for f in updates))
    assert WindowUpdated(stream_id, 40_000) in events
    assert client.pending(stream_id) == 0
    events = pump(client, srv)
    assert sum(len(e.data) for e in of(Data, events)) == 100_000 - 65535  # type: ignore[attr-defined]
    assert events[-1] == Trailers(stream_id, [(b"x-t", b"1")])


def test_initial_window_change_applies_to_open_streams() -> None:
    client, _ = pair()
    stream_id = client.send_request(POST)
    client.send_data(stream_id, b"a" * 70_000, end_stream=True)
    assert client.pending(stream_id) == 70_000 - 65535
    client.receive(frame(SETTINGS, 0, 0, setting(4, 100_000)))
    assert client.pending(stream_id) == 0
    frames = parse(client.data_to_send())
    assert frames[-1][0] == DATA
    assert frames[-1][1] & END_STREAM


def test_connection_window_is_shared_and_flushes_every_blocked_stream() -> None:
    client, _ = pair(settings=Settings(initial_window_size=1 << 20, connection_window=65535))
    first = client.send_request(POST)
    second = client.send_request(POST)
    client.send_data(first, b"a" * 60_000)
    client.send_data(second, b"b" * 60_000)
    assert client.send_window == 0
    assert client.pending(second) == 60_000 - 5535
    client.receive(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 100_000)))
    assert client.pending(second) == 0


def test_sender_beyond_our_window_is_a_flow_control_error() -> None:
    srv = server(settings=Settings(connection_window=65535))
    block = Encoder().encode(POST)
    data = b"".join(frame(DATA, 0, 1, b"x" * 16384) for _ in range(5))
    events = srv.receive(frame(HEADERS, END_HEADERS, 1, block) + data)
    assert events[-1] == ConnectionTerminated(
        ErrorCode.FLOW_CONTROL_ERROR,
        1,
        b"DATA beyond the connection's flow-control window",
        False,
    )
    assert goaway(srv)[0] == ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflow() -> None:
    srv = server()
    events = srv.receive(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF)))
    assert events[-1].error_code == ErrorCode.FLOW_CONTROL_ERROR  # type: ignore[attr-defined]


# -- streams: states, resets, GOAWAY -------------------------------------------------------


def test_reset_by_peer_and_by_us() -> None:
    client, srv = pair()
    one = client.send_request(REQUEST, end_stream=True)
    two = client.send_request(REQUEST, end_stream=True)
    pump(client, srv)
    client.reset_stream(one)
    assert pump(client, srv) == [StreamReset(one, ErrorCode.CANCEL, True)]
    srv.reset_stream(two, ErrorCode.REFUSED_STREAM)
    assert pump(srv, client) == [StreamReset(two, ErrorCode.REFUSED_STREAM, True)]
    # Frames the server sent before it saw our RST_STREAM are ignored, not errors.
    srv2_client, srv2 = pair()
    stream_id = srv2_client.send_request(REQUEST, end_stream=True)
    pump(srv2_client, srv2)
    srv2.send_headers(stream_id, OK)
    srv2.send_data(stream_id, b"late", end_stream=True)
    srv2_client.reset_stream(stream_id)
    assert pump(srv2, srv2_client) == []
    assert not srv2_client.closed
    with pytest.raises(StreamClosedError):
        srv2_client.send_data(stream_id, b"x")


def test_goaway_refuses_streams_above_last_id() -> None:
    client, srv = pair()
    ids = [client.send_request(REQUEST, end_stream=True) for _ in range(3)]
    pump(client, srv)
    events = client.receive(frame(GOAWAY, 0, 0, struct.pack(">LL", ids[0], 0) + b"bye"))
    assert StreamReset(ids[1], ErrorCode.REFUSED_STREAM, True) in events
    assert StreamReset(ids[2], ErrorCode.REFUSED_STREAM, True) in events
    assert events[-1] == ConnectionTerminated(0, ids[0], b"bye", True)
    assert list(client.streams) == [ids[0]]
    with pytest.raises(TooManyStreamsError, match="GOAWAY"):
        client.send_request(REQUEST)


def test_graceful_close_ignores_new_streams() -> None:
    client, srv = pair()
    client.send_request(REQUEST, end_stream=True)
    pump(client, srv)
    srv.close()
    frames = parse(srv.data_to_send())
    assert frames == [(GOAWAY, 0, 0, struct.pack(">LL", 1, 0))]
    late = client.send_request(POST)
    client.send_data(late, b"ignored too", end_stream=True)
    assert pump(client, srv) == []
    assert resets(srv.data_to_send()) == {}
    srv.send_headers(1, OK, end_stream=True)
    assert pump(srv, client) == [HeadersReceived(1, OK, True)]


def test_client_respects_peer_max_concurrent_streams() -> None:
    client, srv = pair(settings=Settings(max_concurrent_streams=2))
    client.send_request(REQUEST, end_stream=True)
    client.send_request(REQUEST, end_stream=True)
    assert not client.open_stream_allowed()
    with pytest.raises(TooManyStreamsError, match="peer allows 2"):
        client.send_request(REQUEST)
    pump(client, srv)
    srv.send_headers(1, OK, end_stream=True)
    pump(srv, client)
    assert client.open_stream_allowed()


def test_misuse_raises() -> None:
    client, srv = pair()
    with pytest.raises(H2Error):
        srv.send_request(REQUEST)
    with pytest.raises(StreamClosedError):
        client.send_data(99, b"x")
    stream_id = client.send_request(REQUEST, end_stream=True)
    with pytest.raises(StreamClosedError, match="already ended"):
        client.send_data(stream_id, b"x")


# -- protections: connection errors --------------------------------------------------------

BLOCK = Encoder().encode(REQUEST)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(DATA, 0, 1, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"12345"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, ACK, 0, setting(1, 1)), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 1), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, setting(2, 2)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, setting(4, 1 << 31)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(SETTINGS, 0, 0, setting(5, 100)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, setting(5, 1 << 24)), ErrorCode.PROTOCOL_ERROR),
        (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
        (frame(DATA, 0, 1, b"x"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(HEADERS, END_HEADERS, 0, BLOCK), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 2, BLOCK), ErrorCode.PROTOCOL_ERROR),  # even: server's
        (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x10" + BLOCK), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, 0, 1, BLOCK) + frame(PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, 0, 1, BLOCK) + frame(CONTINUATION, 4, 3, b""), ErrorCode.PROTOCOL_ERROR),
        (frame(CONTINUATION, END_HEADERS, 1, BLOCK), ErrorCode.PROTOCOL_ERROR),
        (frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2" + BLOCK), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 5, b"\0\0\0\1"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(RST_STREAM, 0, 1, b"\0\0\0\0"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(RST_STREAM, 0, 0, b"\0\0\0\0"), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 1, b"\0\0\0"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(GOAWAY, 0, 1, b"\0" * 8), ErrorCode.PROTOCOL_ERROR),
        (frame(GOAWAY, 0, 0, b"\0" * 7), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PRIORITY, 0, 0, b"\0" * 5), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 1, b"\x80"), ErrorCode.COMPRESSION_ERROR),
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"), ErrorCode.COMPRESSION_ERROR),
    ],
)
def test_malformed_frames_end_the_connection(data: bytes, code: ErrorCode) -> None:
    srv = server()
    events = srv.receive(data)
    assert type(events[-1]) is ConnectionTerminated
    assert events[-1].error_code == code
    assert not events[-1].remote
    assert goaway(srv)[0] == code
    assert srv.closed
    # After the GOAWAY nothing more is processed.
    assert srv.receive(frame(PING, 0, 0, b"12345678")) == []
    assert srv.data_to_send() == b""


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        PREFACE[:10] + b"X" * 30,
        PREFACE + frame(PING, 0, 0, b"12345678"),  # the first frame must be SETTINGS
        PREFACE + frame(SETTINGS, ACK, 0),
    ],
)
def test_bad_preface(data: bytes) -> None:
    srv = H2Connection(client=False)
    srv.initiate()
    srv.data_to_send()
    events = srv.receive(data)
    assert events[-1].error_code == ErrorCode.PROTOCOL_ERROR  # type: ignore[attr-defined]


def test_partial_preface_waits() -> None:
    srv = H2Connection(client=False)
    assert srv.receive(PREFACE[:5]) == []
    assert srv.receive(PREFACE[5:] + frame(SETTINGS, 0, 0)) == [SettingsChanged({})]


def test_headers_on_a_closed_stream() -> None:
    srv = server()
    srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, BLOCK))
    srv.send_headers(1, OK, end_stream=True)
    assert srv.streams == {}
    events = srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode([])))
    assert events[-1].error_code == ErrorCode.STREAM_CLOSED  # type: ignore[attr-defined]


def test_hpack_bomb_is_enhance_your_calm() -> None:
    srv = server(settings=Settings(max_header_list_size=16384))
    encoder = Encoder(huffman=False)
    seed = encoder.encode([*REQUEST, (b"x-big", b"b" * 3000)])
    srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, seed))
    srv.data_to_send()
    bomb = encoder.encode(REQUEST) + b"\xbe" * 100  # the 3 KB entry, 100 times
    events = srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3, bomb))
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    assert goaway(srv)[0] == ErrorCode.ENHANCE_YOUR_CALM


def test_continuation_flood_is_enhance_your_calm() -> None:
    srv = server(limits=Limits(max_continuation_frames=10))
    data = frame(HEADERS, 0, 1, BLOCK[:1]) + frame(CONTINUATION, 0, 1, b"") * 11
    events = srv.receive(data)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_oversized_header_block_is_enhance_your_calm() -> None:
    srv = server(settings=Settings(max_header_list_size=1000))
    data = frame(HEADERS, 0, 1, b"\0" * 16384) + frame(CONTINUATION, 0, 1, b"\0" * 16384)
    events = srv.receive(data)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rapid_reset_is_enhance_your_calm() -> None:
    """CVE-2023-44487: open and reset streams as fast as the wire allows."""
    clock = Clock()
    srv = server(limits=Limits(reset_burst=100, reset_rate=10.0), clock=clock)
    encoder = Encoder()
    data = b"".join(
        frame(HEADERS, END_HEADERS, stream_id, encoder.encode(REQUEST))
        + frame(RST_STREAM, 0, stream_id, struct.pack(">L", ErrorCode.CANCEL))
        for stream_id in range(1, 2 * 100 + 1, 2)
    )
    events = srv.receive(data)
    assert not srv.closed
    assert len(of(StreamReset, events)) == 100
    srv.data_to_send()
    # A few seconds later the budget has refilled a little: ten more are fine...
    clock.now = 1.0
    data = b"".join(
        frame(HEADERS, END_HEADERS, stream_id, encoder.encode(REQUEST))
        + frame(RST_STREAM, 0, stream_id, struct.pack(">L", ErrorCode.CANCEL))
        for stream_id in range(201, 201 + 2 * 11, 2)
    )
    events = srv.receive(data)
    # ...and the eleventh is not.
    assert len(of(StreamReset, events)) == 10
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    assert goaway(srv)[0] == ErrorCode.ENHANCE_YOUR_CALM


def test_stream_flood_is_refused_then_enhance_your_calm() -> None:
    clock = Clock()
    srv = server(
        settings=Settings(max_concurrent_streams=2),
        limits=Limits(reset_burst=5, reset_rate=1.0),
        clock=clock,
    )
    encoder = Encoder()
    data = b"".join(
        frame(HEADERS, END_HEADERS, stream_id, encoder.encode(REQUEST))
        for stream_id in (1, 3, 5, 7)
    )
    events = srv.receive(data)
    assert [e.stream_id for e in of(HeadersReceived, events)] == [1, 3]  # type: ignore[attr-defined]
    assert resets(srv.data_to_send()) == {5: ErrorCode.REFUSED_STREAM, 7: ErrorCode.REFUSED_STREAM}
    # The open streams work on.
    srv.send_headers(1, OK, end_stream=True)
    assert parse(srv.data_to_send())[0][0] == HEADERS
    # Refused streams count against the reset budget: a flood of them ends the connection.
    data = b"".join(
        frame(HEADERS, END_HEADERS, stream_id, encoder.encode(REQUEST))
        for stream_id in range(9, 9 + 2 * 10, 2)
    )
    events = srv.receive(data)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_ping_flood_is_enhance_your_calm() -> None:
    clock = Clock()
    srv = server(limits=Limits(control_burst=50, control_rate=10.0), clock=clock)
    events = srv.receive(frame(PING, 0, 0, b"12345678") * 49)
    assert len(events) == 49
    srv.data_to_send()
    events = srv.receive(frame(PING, 0, 0, b"12345678") * 5)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_settings_flood_is_enhance_your_calm() -> None:
    srv = server(limits=Limits(control_burst=20, control_rate=0.0), clock=Clock())
    events = srv.receive(frame(SETTINGS, 0, 0) * 25)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_replies_the_caller_never_drains_are_bounded() -> None:
    srv = server(limits=Limits(max_pending_replies=100))
    for _ in range(3):
        events = srv.receive(frame(PING, 0, 0, b"12345678") * 40)
    assert events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


# -- protections: stream errors (the connection lives on) ----------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":scheme", b"http")],  # no :path
        [(b":scheme", b"http"), (b":path", b"/")],  # no :method
        [*REQUEST, (b":path", b"/again")],  # duplicate pseudo-header
        [(b"x-a", b"1"), *REQUEST],  # pseudo-header after a regular one
        [*REQUEST, (b":status", b"200")],  # response pseudo-header in a request
        [*REQUEST, (b"connection", b"close")],
        [*REQUEST, (b"transfer-encoding", b"chunked")],
        [*REQUEST, (b"te", b"gzip")],
        [*REQUEST, (b"Upper-Case", b"x")],
        [*REQUEST, (b"x-bad", b"a\r\nb")],
        [*REQUEST, (b"content-length", b"abc")],
        [*REQUEST, (b"content-length", b"1"), (b"content-length", b"2")],
        [(b":method", b"CONNECT"), (b":authority", b"x:1"), (b":path", b"/")],
        [(b":method", b"CONNECT")],
        [*REQUEST[:2], (b":path", b""), REQUEST[3]],
        [*REQUEST[:2], (b":path", b"http://x/"), REQUEST[3]],
    ],
)
def test_malformed_requests_reset_the_stream_only(headers: list[tuple[bytes, bytes]]) -> None:
    srv = server()
    events = srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode(headers)))
    assert events == []  # the caller never hears of the stream
    assert resets(srv.data_to_send()) == {1: ErrorCode.PROTOCOL_ERROR}
    events = srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3, Encoder().encode(REQUEST)))
    assert events == [HeadersReceived(3, REQUEST, True)]


def test_connect_and_te_trailers_are_valid() -> None:
    srv = server()
    connect = [(b":method", b"CONNECT"), (b":authority", b"example:443")]
    grpc = [*POST, (b"te", b"trailers")]
    encoder = Encoder()
    events = srv.receive(
        frame(HEADERS, END_HEADERS, 1, encoder.encode(connect))
        + frame(HEADERS, END_HEADERS, 3, encoder.encode(grpc))
    )
    assert events == [HeadersReceived(1, connect, False), HeadersReceived(3, grpc, False)]


def test_content_length_mismatch_resets_the_stream() -> None:
    srv = server()
    encoder = Encoder()
    events = srv.receive(
        frame(HEADERS, END_HEADERS, 1, encoder.encode([*POST, (b"content-length", b"3")]))
        + frame(DATA, END_STREAM, 1, b"toolong")
    )
    assert events[-1] == StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)
    assert resets(srv.data_to_send()) == {1: ErrorCode.PROTOCOL_ERROR}
    events = srv.receive(
        frame(HEADERS, END_HEADERS, 3, encoder.encode([*POST, (b"content-length", b"3")]))
        + frame(DATA, END_STREAM, 3, b"abc")
    )
    assert events[-1] == Data(3, b"abc", True, 3)


def test_trailers_must_end_the_stream_and_carry_no_pseudo_headers() -> None:
    srv = server()
    encoder = Encoder()
    srv.receive(frame(HEADERS, END_HEADERS, 1, encoder.encode(POST)))
    events = srv.receive(frame(HEADERS, END_HEADERS, 1, encoder.encode([(b"x-t", b"1")])))
    assert events == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    srv.receive(frame(HEADERS, END_HEADERS, 3, encoder.encode(POST)))
    events = srv.receive(
        frame(HEADERS, END_HEADERS | END_STREAM, 3, encoder.encode([(b":path", b"/")]))
    )
    assert events == [StreamReset(3, ErrorCode.PROTOCOL_ERROR, False)]


def test_data_after_end_stream_is_stream_closed() -> None:
    srv = server()
    srv.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, BLOCK))
    srv.data_to_send()
    events = srv.receive(frame(DATA, 0, 1, b"more"))
    assert events == [StreamReset(1, ErrorCode.STREAM_CLOSED, False)]
    assert resets(srv.data_to_send()) == {1: ErrorCode.STREAM_CLOSED}
    assert srv.recv_window + srv.unacknowledged == 1 << 20  # its credit returns all the same


def test_self_dependency_is_a_stream_error() -> None:
    srv = server()
    events = srv.receive(frame(HEADERS, END_HEADERS, 1, BLOCK))
    events = srv.receive(frame(PRIORITY, 0, 1, struct.pack(">LB", 1, 0)))
    assert events == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    assert not srv.closed


@pytest.mark.parametrize("status", [b"20", b"2000", b"abc", b"099", b"101"])
def test_malformed_responses_reset_the_stream(status: bytes) -> None:
    client, srv = pair()
    stream_id = client.send_request(REQUEST, end_stream=True)
    pump(client, srv)
    bad = Encoder().encode([(b":status", status)])
    # the server's HPACK state is not ours to borrow: a fresh table suffices for literals
    events = client.receive(frame(HEADERS, END_HEADERS, stream_id, bad))
    assert events == [StreamReset(stream_id, ErrorCode.PROTOCOL_ERROR, False)]
    assert not client.closed
