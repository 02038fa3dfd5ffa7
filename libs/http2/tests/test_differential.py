"""Differential tests against the `h2` package: exchanges our codec carries with h2 on the
other side, in both roles, must deliver the same headers, bodies and trailers; and frames h2
considers malformed must end our connection too (never an exception out of `receive`)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from hypothesis import given, settings
from hypothesis import strategies as st

from istio.http2 import (
    ConnectionTerminated,
    Data,
    H2Connection,
    HeadersReceived,
    Trailers,
)

Headers = list[tuple[bytes, bytes]]

names = st.from_regex(rb"\Ax-[a-z0-9\-]{1,16}\Z")
values = st.from_regex(rb"\A([!-~]([ !-~]{0,30}[!-~])?)?\Z")
extra_headers = st.lists(st.tuples(names, values), max_size=8)
bodies = st.lists(st.binary(min_size=1, max_size=40_000), max_size=4)
trailer_lists = st.none() | st.lists(st.tuples(names, values), min_size=1, max_size=3)


def _request(path: bytes, extra: Headers) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"example"),
        *extra,
    ]


def _h2(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


def _drive(ours: H2Connection, theirs: h2.connection.H2Connection) -> tuple[list, list]:
    """Exchange bytes until both sides are quiet; each side consumes (acknowledges) all."""
    our_events: list[object] = []
    their_events: list[object] = []
    for _ in range(200):
        to_them = ours.data_to_send()
        if to_them:
            for event in theirs.receive_data(to_them):
                their_events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    theirs.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        to_us = theirs.data_to_send()
        if to_us:
            for event in ours.receive(to_us):
                our_events.append(event)
                if type(event) is Data:
                    ours.acknowledge(event.stream_id, event.flow_length)
        if not to_them and not to_us:
            return our_events, their_events
    raise AssertionError("the exchange did not settle")


@settings(max_examples=60, deadline=None)
@given(extra_headers, bodies, trailer_lists, bodies)
def test_our_client_against_h2_server(
    extra: Headers, body: list[bytes], trailers: Headers | None, response: list[bytes]
) -> None:
    ours = H2Connection(client=True)
    ours.initiate()
    theirs = _h2(client=False)
    _drive(ours, theirs)
    request = _request(b"/p", extra)
    stream_id = ours.send_request(request)
    for index, chunk in enumerate(body):
        ours.send_data(stream_id, chunk, end_stream=trailers is None and index == len(body) - 1)
    if trailers is not None:
        ours.send_headers(stream_id, trailers, end_stream=True)
    elif not body:
        ours.end_stream(stream_id)
    _, their_events = _drive(ours, theirs)
    received = [e for e in their_events if isinstance(e, h2.events.RequestReceived)]
    assert received[0].headers == request
    got = b"".join(e.data for e in their_events if isinstance(e, h2.events.DataReceived))
    assert got == b"".join(body)
    got_trailers = [e.headers for e in their_events if isinstance(e, h2.events.TrailersReceived)]
    assert got_trailers == ([trailers] if trailers is not None else [])
    assert any(isinstance(e, h2.events.StreamEnded) for e in their_events)

    theirs.send_headers(stream_id, [(b":status", b"200"), *extra])
    our_events: list[object] = []
    for chunk in response:
        # h2 does not queue: send what its windows allow, as a caller of h2 must.
        while chunk:
            window = theirs.local_flow_control_window(stream_id)
            size = min(window, theirs.max_outbound_frame_size, len(chunk))
            assert size > 0
            theirs.send_data(stream_id, chunk[:size])
            chunk = chunk[size:]
            our_events += _drive(ours, theirs)[0]
    theirs.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    our_events += _drive(ours, theirs)[0]
    assert our_events[0] == HeadersReceived(stream_id, [(b":status", b"200"), *extra], False)
    got = b"".join(e.data for e in our_events if type(e) is Data)  # type: ignore[attr-defined]
    assert got == b"".join(response)
    assert our_events[-1] == Trailers(stream_id, [(b"grpc-status", b"0")])
    assert ours.streams == {}


@settings(max_examples=60, deadline=None)
@given(extra_headers, bodies, trailer_lists)
def test_h2_client_against_our_server(
    extra: Headers, body: list[bytes], trailers: Headers | None
) -> None:
    ours = H2Connection(client=False)
    ours.initiate()
    theirs = _h2(client=True)
    request = _request(b"/q", extra)
    theirs.send_headers(1, request, end_stream=not body and trailers is None)
    our_events, _ = _drive(ours, theirs)
    for index, chunk in enumerate(body):
        while chunk:
            size = min(
                theirs.local_flow_control_window(1), theirs.max_outbound_frame_size, len(chunk)
            )
            assert size > 0
            last = trailers is None and index == len(body) - 1 and size == len(chunk)
            theirs.send_data(1, chunk[:size], end_stream=last)
            chunk = chunk[size:]
            our_events += _drive(ours, theirs)[0]
    if trailers is not None:
        theirs.send_headers(1, trailers, end_stream=True)
        our_events += _drive(ours, theirs)[0]
    heads = [e for e in our_events if type(e) is HeadersReceived]
    assert heads == [HeadersReceived(1, request, not body and trailers is None)]
    got = b"".join(e.data for e in our_events if type(e) is Data)  # type: ignore[attr-defined]
    assert got == b"".join(body)
    assert [e for e in our_events if type(e) is Trailers] == (
        [Trailers(1, trailers)] if trailers is not None else []
    )
    # And the response, with more data than h2's initial window: our queue drains as it acks.
    ours.send_headers(1, [(b":status", b"200")])
    ours.send_data(1, b"r" * 200_000)
    ours.send_headers(1, [(b"x-done", b"1")], end_stream=True)
    _, their_events = _drive(ours, theirs)
    got = b"".join(e.data for e in their_events if isinstance(e, h2.events.DataReceived))
    assert got == b"r" * 200_000
    assert [e.headers for e in their_events if isinstance(e, h2.events.TrailersReceived)] == [
        [(b"x-done", b"1")]
    ]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_after_the_preface_never_raises(data: bytes) -> None:
    ours = H2Connection(client=False)
    ours.initiate()
    theirs = _h2(client=True)
    ours.receive(theirs.data_to_send())
    events = ours.receive(data)
    for event in events:
        if type(event) is ConnectionTerminated:
            assert ours.closed
    ours.data_to_send()
