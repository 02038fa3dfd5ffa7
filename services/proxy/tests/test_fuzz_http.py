"""Differential fuzzing of the downstream HTTP/1.1 path against h11.

Hypothesis writes request byte streams: valid pipelined requests (Content-Length and chunked
bodies, HTTP/1.0 and 1.1, keep-alive and close), then mutated ones (obs-fold, Content-Length
with Transfer-Encoding, duplicate Content-Length, bad chunk sizes, bare LF, huge headers,
stray bytes), sent in pieces split at random points to an in-process proxy on loopback whose
one route goes to a trivial upstream that records each complete request it gets (parsed with
h11 too). h11 parses the same bytes as the reference. For every input either the proxy
forwarded exactly the requests h11 saw (method, target, headers, body bytes), or it forwarded a
prefix of them and then answered 400 (431, 408) and closed; valid input must pass whole. A
request h11 did not see never reaches the upstream (no smuggling), and nothing escapes: the
proxy's log has no exception when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Collection
from dataclasses import dataclass, field

import h11
import httptools
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context, Limits
from istio.proxy.listeners import ListenerManager

PROXY_IP, UPSTREAM_IP = "127.0.0.33", "127.0.0.34"
MAX_HEADER_BYTES = 8192  # the proxy's limit here; "huge" headers are far beyond h11's 16 KiB
ERROR_STATUSES = {400, 408, 431}
# What the proxy adds, or rewrites as the framing of its own upstream request.
PROXY_HEADERS = {
    "content-length",
    "transfer-encoding",
    "connection",
    "x-request-id",
    "x-forwarded-proto",
    "x-forwarded-for",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-internal",
}

Request = tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes]


def _request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    kept = tuple(
        (name.lower(), value.strip())
        for name, value in headers
        if name.lower().decode() not in PROXY_HEADERS
    )
    return method, target, kept, b""


def reference(data: bytes) -> tuple[list[Request], bool]:
    """h11's reading of `data`: the complete requests, and whether it found an error."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    conn.receive_data(data)
    requests: list[Request] = []
    current: Request | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return requests, True
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return requests, False
        if isinstance(event, h11.Request):
            current = _request(event.method, event.target, list(event.headers.raw_items()))
        elif isinstance(event, h11.Data):
            assert current is not None
            current = (*current[:3], current[3] + bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            requests.append(current)
            current = None
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is not h11.DONE:
                return requests, False  # the request asked to close: the rest is ignored
            conn.start_next_cycle()


# Generation: requests as lists of lines, so mutations can reach into them.

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda s: s[0] != "-" and f"x-{s}" not in PROXY_HEADERS
)
VALUE = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;=,./:-_\"'()",
    max_size=30,
).map(str.strip)
PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%?=&", max_size=20)
METHOD = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


@st.composite
def valid_request(draw: st.DrawFn) -> list[bytes]:
    """One request's lines (without their CRLFs), then its body bytes as the last item."""
    method = draw(METHOD)
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0"]))
    lines = [f"{method} /{draw(PATH)} HTTP/{version}".encode(), b"Host: svc"]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"x-{draw(TOKEN)}: {draw(VALUE)}".encode())
    # No HTTP/1.0 keep-alive: h11 closes after any 1.0 request (the proxy keeps it open).
    if version == "1.1" and draw(st.integers(0, 9)) == 0:
        lines.append(b"Connection: close")
    body = draw(st.binary(max_size=300))
    framing = draw(
        st.sampled_from(["none", "length", "chunked"] if version == "1.1" else ["none", "length"])
    )
    payload = b""
    if framing == "none":
        pass
    elif framing == "length" or not body:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        lines.append(b"Transfer-Encoding: chunked")
        rest = body
        while rest:
            size = draw(st.integers(1, len(rest)))
            payload += b"%x\r\n%b\r\n" % (size, rest[:size])
            rest = rest[size:]
        payload += b"0\r\n"
        if draw(st.integers(0, 4)) == 0:
            payload += b"x-trailer: t\r\n"
        payload += b"\r\n"
    return [*lines, payload]


def serialize(request: list[bytes]) -> bytes:
    *lines, payload = request
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + payload


MUTATIONS = (
    "fold",
    "cl_te",
    "duplicate_cl",
    "conflicting_cl",
    "bad_chunk",
    "bare_lf",
    "huge_header",
    "huge_target",
    "bad_te",
    "space_before_colon",
    "stray_bytes",
    "truncate",
)


@st.composite
def mutated(draw: st.DrawFn, request: list[bytes]) -> bytes:
    """`request` broken in one of the ways smuggling and parser bugs are made of."""
    *lines, payload = request
    kind = draw(st.sampled_from(MUTATIONS))
    at = draw(st.integers(1, len(lines)))  # after the request line
    if kind == "fold":
        lines.insert(at, b" " + draw(VALUE).encode() or b" x")
        if at == len(lines) - 1 or at == 1:
            lines.insert(at, b"x-folded: a")
    elif kind == "cl_te":
        lines.insert(at, b"Content-Length: %d" % draw(st.integers(0, 10)))
        lines.insert(at, b"Transfer-Encoding: chunked")
        payload = b"0\r\n\r\n" + payload
    elif kind == "duplicate_cl":
        lines = [line for line in lines if not line.lower().startswith(b"content-length")]
        lines += [b"Content-Length: %d" % len(payload)] * 2
    elif kind == "conflicting_cl":
        lines.insert(at, b"Content-Length: %d" % (len(payload) + draw(st.integers(1, 5))))
    elif kind == "bad_chunk":
        lines = [line for line in lines if not line.lower().startswith(b"content-length")]
        lines.append(b"Transfer-Encoding: chunked")
        size = draw(st.sampled_from([b"zz", b"-1", b"ffffffffffffffffffff", b"1 2", b"0x5", b""]))
        payload = size + b"\r\nhello\r\n0\r\n\r\n"
    elif kind == "bare_lf":
        whole = serialize([*lines, payload])
        positions = [i for i in range(len(whole) - 1) if whole[i : i + 2] == b"\r\n"]
        index = draw(st.sampled_from(positions))
        return whole[:index] + whole[index + 1 :]
    elif kind == "huge_header":
        lines.insert(at, b"x-huge: " + b"h" * draw(st.integers(20_000, 70_000)))
    elif kind == "huge_target":
        lines[0] = lines[0].replace(b" /", b" /" + b"t" * draw(st.integers(20_000, 40_000)), 1)
    elif kind == "bad_te":
        lines = [line for line in lines if not line.lower().startswith(b"content-length")]
        lines.append(
            b"Transfer-Encoding: "
            + draw(st.sampled_from([b"gzip", b"chunked, gzip", b"identity", b"chunked, chunked"]))
        )
        payload = b"5\r\nhello\r\n0\r\n\r\n"
    elif kind == "space_before_colon":
        lines.insert(at, b"Content-Length : 3")
    elif kind == "stray_bytes":
        lines.insert(
            at,
            draw(
                st.sampled_from(
                    [b"\x00bad: x", b"no-colon", b"x-ctl: a\x01b", b": empty", b"\x7f: x"]
                )
            ),
        )
    else:  # truncate: the request ends somewhere in the middle
        whole = serialize([*lines, payload])
        return whole[: draw(st.integers(0, len(whole)))]
    return serialize([*lines, payload])


@dataclass
class Case:
    data: bytes
    splits: list[int]
    mutated: bool


@st.composite
def case(draw: st.DrawFn) -> Case:
    requests = draw(st.lists(valid_request(), min_size=1, max_size=4))
    chunks = []
    is_mutated = False
    for index, request in enumerate(requests):
        if draw(st.integers(0, 2)) == 0:
            chunks.append(draw(mutated(request)))
            is_mutated = True
        else:
            chunks.append(serialize(request))
        if is_mutated and index < len(requests) - 1 and draw(st.booleans()):
            break
    data = b"".join(chunks)
    splits = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    return Case(data, splits, is_mutated)


# The peers


@dataclass
class Upstream:
    """Records each complete request; answers 200 with an empty body."""

    requests: list[Request] = field(default_factory=list)
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)
        conn = h11.Connection(h11.SERVER)
        current: Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Request):
                    current = _request(event.method, event.target, list(event.headers.raw_items()))
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current = (*current[:3], current[3] + bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    self.requests.append(current)
                    response = h11.Response(status_code=200, headers=[("content-length", "0")])
                    writer.write(conn.send(response) + conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            writer.close()


class Responses:
    """The proxy's answers, parsed with httptools."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


async def exchange(
    port: int, test: Case, expected: int, connections: Collection[object]
) -> tuple[list[int], bool]:
    """Sends the case in its pieces; reads answers until `expected` of them, or the close;
    closes and waits until the proxy has let go of the connection too, so that nothing it
    still forwards is counted against the next case."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    responses = Responses()
    closed = False
    try:
        await loop.sock_connect(sock, (PROXY_IP, port))
        bounds = [0, *test.splits, len(test.data)]
        # The proxy may refuse and close before it has everything: sending stops then, and
        # its answer is still read (the kernel keeps what arrived before the reset).
        with contextlib.suppress(ConnectionError):
            for start, end in itertools.pairwise(bounds):
                if end > start:
                    await loop.sock_sendall(sock, test.data[start:end])
                    await asyncio.sleep(0)
        while len(responses.statuses) < expected or (
            responses.statuses and responses.statuses[-1] in ERROR_STATUSES
        ):
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 2)
            except TimeoutError:
                break
            except ConnectionError:
                data = b""
            if not data:
                closed = True
                break
            responses.parser.feed_data(data)
    finally:
        sock.close()
    for _ in range(200):
        if not connections:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.002)  # the upstream's reading of anything already sent to it
    return responses.statuses, closed


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_request_boundaries_match_h11() -> None:
    loop = asyncio.new_event_loop()
    upstream = Upstream()
    context = Context(limits=Limits(header_timeout=5, max_header_bytes=MAX_HEADER_BYTES))
    manager = ListenerManager(context, PROXY_IP)
    errors = Errors()
    watched = [logging.getLogger("istio.proxy"), logging.getLogger("asyncio")]
    for logger in watched:
        logger.addHandler(errors)

    async def setup() -> int:
        upstream.server = await asyncio.start_server(upstream.handle, UPSTREAM_IP, 0)
        up_port = upstream.server.sockets[0].getsockname()[1]
        route = Route(
            name="all",
            match=RouteMatch(PathKind.PREFIX, "/"),
            action=RouteAction(clusters=(("up", 1),), total_weight=1, timeout=10.0),
        )
        table = RouteTable.build("t", (VirtualHost("svc", ("svc",), (route,)),))
        listener = Listener("http", "0.0.0.0", 0, True, False, HttpManager("fuzz", routes=table))
        cluster = Cluster("up", ClusterType.STATIC, endpoints=(Endpoint(UPSTREAM_IP, up_port),))
        snapshot = Snapshot(listeners={"http": listener}, clusters={"up": cluster})
        context.apply(snapshot)
        await manager.apply(snapshot)
        server = manager.bound["http"].server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])

    port = loop.run_until_complete(setup())
    connections = manager.bound["http"].connections

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(case())
    def check(test: Case) -> None:
        expected, h11_error = reference(test.data)
        upstream.requests.clear()
        statuses, closed = loop.run_until_complete(
            exchange(port, test, len(expected) + (1 if h11_error else 0), connections)
        )
        forwarded = list(upstream.requests)
        ok = [s for s in statuses if s not in ERROR_STATUSES]
        event(f"h11 {'error' if h11_error else 'ok'}, proxy {statuses[len(ok) :] or 'ok'}")
        assert all(s == 200 for s in ok), statuses
        assert forwarded == expected[: len(forwarded)], (forwarded, expected)
        assert len(ok) == len(forwarded), (statuses, forwarded)
        if len(statuses) > len(ok):  # the proxy refused something: once, last, and closed
            assert statuses[-1] in ERROR_STATUSES
            assert statuses.count(statuses[-1]) == 1
            assert statuses[:-1] == ok, statuses
            assert closed, statuses
            assert test.mutated, (statuses, expected)  # never for valid input
        else:  # no refusal: the same requests as h11, which saw no error either
            assert forwarded == expected, (forwarded, expected, statuses)
            assert not h11_error, (forwarded, statuses)
        assert not errors.records, [r.getMessage() for r in errors.records]

    try:
        check()
    finally:
        for logger in watched:
            logger.removeHandler(errors)

        async def teardown() -> None:
            await manager.close()
            context.clusters.apply({}, {})  # closes the proxy's idle upstream connections
            assert upstream.server is not None
            upstream.server.close()
            for task in list(upstream.handlers):
                task.cancel()
            await asyncio.gather(*upstream.handlers, return_exceptions=True)
            await upstream.server.wait_closed()

        loop.run_until_complete(teardown())
        loop.close()
