"""A gRPC client over `H2Connection`: unary and bidirectional-streaming calls on one h2c
connection to `host:port`, with messages as bytes (the caller serialises its protobufs).

    async with Channel("127.0.0.1:15010") as channel:
        reply = await channel.unary("/pkg.Service/Method", request_bytes, timeout=5)
        call = channel.stream("/pkg.Service/Stream")
        await call.send(first)
        async for message in call:
            ...

Theory of operation. The channel owns at most one live connection, made on the first call and
again after the peer's GOAWAY or a lost connection. The connection is an asyncio protocol that
feeds received bytes to the codec and routes its events to the calls by stream id. A call
queues whole messages; credit for a message goes back to the server when the caller takes it
(`recv`), while bytes of a message still arriving are acknowledged at once (a message larger
than the window must be able to complete). `send` waits while the stream has more than
`SEND_BUFFER` bytes the server's windows have not admitted, or the transport is paused.

A call ends with the server's grpc-status (anything but OK raises `RpcError` from `recv`,
`send` or `unary`), with DEADLINE_EXCEEDED when its timeout passes (grpc-timeout tells the
server too), with CANCELLED when the caller cancels it (RST_STREAM CANCEL), and with
UNAVAILABLE when the server refuses the stream, sends GOAWAY with an error or the connection
is lost.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections import deque
from collections.abc import AsyncIterator, Sequence
from enum import IntEnum
from typing import cast
from urllib.parse import unquote

from istio.http2.connection import H2Connection, Settings
from istio.http2.errors import ErrorCode, error_name
from istio.http2.events import (
    ConnectionTerminated,
    Data,
    HeadersReceived,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from istio.http2.hpack import Headers

__all__ = ["Call", "Channel", "Metadata", "RpcError", "StatusCode"]

Metadata = Sequence[tuple[str, str | bytes]]
SEND_BUFFER = 65536
_PREFIX = struct.Struct(">BL")
USER_AGENT = b"istio-http2-grpc/0.1"


class StatusCode(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call that did not end OK: its status code, message and trailing metadata."""

    def __init__(
        self, code: StatusCode, details: str, trailers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = list(trailers)


# gRPC's PROTOCOL-HTTP2.md: HTTP status without grpc-status, and RST_STREAM codes.
_HTTP_STATUS = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}
_RESET_STATUS: dict[int, StatusCode] = {
    ErrorCode.NO_ERROR: StatusCode.INTERNAL,
    ErrorCode.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCode.CANCEL: StatusCode.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def _timeout_header(seconds: float) -> bytes:
    """grpc-timeout: at most 8 digits, in the finest unit that fits."""
    for unit, scale in ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60)):
        value = max(0, int(seconds * scale + 0.999))
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def _text(headers: Headers) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


class Call:
    """One RPC. Iterate it (or `recv`) for the responses; `send` and `done_writing` for a
    streaming request."""

    def __init__(
        self, channel: Channel, method: str, timeout: float | None, metadata: Metadata
    ) -> None:
        self._channel = channel
        self._method = method
        self._timeout = timeout
        self._metadata = metadata
        self._connection: _Connection | None = None
        self.stream_id = 0
        self._messages: deque[bytes] = deque()
        self._buffer = bytearray()
        self._unacknowledged = 0  # flow-controlled bytes received, credit not yet returned
        self._held = 0  # of those, the bytes of whole messages waiting in `_messages`
        self._error: RpcError | None = None
        self._ok = False  # ended with grpc-status 0
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._started: asyncio.Task[None] | None = None
        self.initial_metadata: list[tuple[str, str]] = []
        self.trailing_metadata: list[tuple[str, str]] = []
        self._headers_seen = False
        self._encoding = b"identity"

    @property
    def done(self) -> bool:
        return self._ok or self._error is not None

    @property
    def code(self) -> StatusCode | None:
        if self._ok:
            return StatusCode.OK
        return self._error.code if self._error is not None else None

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._open())
        started = self._started
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            # The call ended (deadline, cancel) while connecting: that is the answer, unless
            # the caller's own task is the one being cancelled.
            task = asyncio.current_task()
            if started.cancelled() and self._error is not None and not (task and task.cancelling()):
                raise self._error from None
            raise

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timeout is not None:
            self._deadline = loop.call_later(self._timeout, self._expire)
        try:
            connection = await self._channel._stream_slot()
        except RpcError as error:
            self._finish(error)
            raise
        if self.done:
            return
        headers: Headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", self._method.encode()),
            (b":authority", self._channel.authority),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", USER_AGENT),
            (b"grpc-accept-encoding", b"identity,gzip,deflate"),
        ]
        if self._timeout is not None:
            remaining = self._deadline.when() - loop.time() if self._deadline else 0.0
            headers.append((b"grpc-timeout", _timeout_header(remaining)))
        for key, value in self._metadata:
            if isinstance(value, str):
                value = value.encode("latin-1")
            elif key.endswith("-bin"):
                value = base64.b64encode(value).rstrip(b"=")
            headers.append((key.lower().encode(), value))
        self._connection = connection
        self.stream_id = connection.open(self, headers)

    def _expire(self) -> None:
        self._finish(RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"), reset=True)

    def cancel(self) -> None:
        """Cancel the call: RST_STREAM CANCEL, and CANCELLED for whoever waits on it. On a
        call that already ended it drops unread messages (returning their credit)."""
        self._finish(RpcError(StatusCode.CANCELLED, "cancelled by the client"), reset=True)
        self._release()

    def _release(self) -> None:
        """Drop queued messages and give the connection back their flow-control credit."""
        self._messages.clear()
        self._buffer.clear()
        self._held = 0
        connection = self._connection
        if self._unacknowledged and connection is not None and not connection.lost:
            connection.h2.acknowledge(self.stream_id, self._unacknowledged)
            connection.flush()
        self._unacknowledged = 0

    def _finish(self, error: RpcError | None, *, reset: bool = False) -> None:
        if self.done:
            return
        if error is None:
            self._ok = True
        else:
            self._error = error
            self._release()
        if self._deadline is not None:
            self._deadline.cancel()
        connection = self._connection
        if connection is not None:
            if reset:
                connection.h2.reset_stream(self.stream_id, ErrorCode.CANCEL)
            connection.forget(self)
        elif self._started is not None and not self._started.done():
            self._started.cancel()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- sending --

    async def send(self, message: bytes) -> None:
        """Send one request message; waits while the server's flow control holds earlier ones."""
        await self._start()
        connection = self._connection
        if self._error is not None:
            raise self._error
        if self.done or connection is None:
            raise RpcError(StatusCode.INTERNAL, "send after the call ended")
        connection.h2.send_data(self.stream_id, _PREFIX.pack(0, len(message)) + message)
        connection.flush()
        while not self.done and (
            connection.h2.pending(self.stream_id) > SEND_BUFFER or connection.paused
        ):
            await self._wait()
        if self._error is not None:
            raise self._error

    async def done_writing(self) -> None:
        """End the request stream (half-close)."""
        await self._start()
        if self._error is not None:
            raise self._error
        connection = self._connection
        if connection is not None and not self.done:
            connection.h2.end_stream(self.stream_id)
            connection.flush()

    # -- receiving --

    async def recv(self) -> bytes | None:
        """The next response message; None once the call ended OK; RpcError otherwise."""
        await self._start()
        while True:
            if self._messages:
                message = self._messages.popleft()
                size = len(message) + 5
                self._held -= size
                self._unacknowledged -= size
                connection = self._connection
                if connection is not None and not connection.lost:
                    connection.h2.acknowledge(self.stream_id, size)
                    connection.flush()
                return message
            if self._error is not None:
                raise self._error
            if self._ok:
                return None
            await self._wait()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (message := await self.recv()) is not None:
            yield message

    def _on_headers(self, headers: Headers, end_stream: bool) -> None:
        self._headers_seen = True
        status = b""
        content_type = b""
        for name, value in headers:
            if name == b":status":
                status = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                self._encoding = value
        if end_stream:  # trailers-only: status and trailers in one block
            self._on_trailers(headers)
            return
        if status != b"200":
            code = _HTTP_STATUS.get(int(status), StatusCode.UNKNOWN)
            self._finish(RpcError(code, f"HTTP status {status.decode()}"), reset=True)
            return
        if not content_type.startswith(b"application/grpc"):
            self._finish(
                RpcError(StatusCode.UNKNOWN, f"content-type {content_type.decode('latin-1')!r}"),
                reset=True,
            )
            return
        self.initial_metadata = [
            (name, value) for name, value in _text(headers) if not name.startswith(":")
        ]

    def _on_data(self, data: bytes, flow_length: int) -> None:
        buffer = self._buffer
        buffer += data
        self._unacknowledged += flow_length
        limit = self._channel.max_message_length
        while len(buffer) >= 5:
            compressed, length = _PREFIX.unpack_from(buffer)
            if length > limit:
                self._finish(
                    RpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"response message of {length} bytes exceeds {limit}",
                    ),
                    reset=True,
                )
                return
            if len(buffer) < 5 + length:
                break
            message = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            if compressed:
                try:
                    message = self._decompress(message)
                except Exception as error:
                    self._finish(RpcError(StatusCode.INTERNAL, str(error)), reset=True)
                    return
            self._messages.append(message)
            self._held += 5 + length
        due = self._unacknowledged - self._held
        if due > 0 and self._connection is not None:
            self._connection.h2.acknowledge(self.stream_id, due)
            self._unacknowledged -= due
        self._wake()

    def _decompress(self, message: bytes) -> bytes:
        import zlib

        if self._encoding == b"gzip":
            return zlib.decompress(message, 16 + zlib.MAX_WBITS)
        if self._encoding == b"deflate":
            return zlib.decompress(message)
        raise ValueError(f"compressed message with grpc-encoding {self._encoding.decode()!r}")

    def _on_trailers(self, headers: Headers) -> None:
        fields = _text(headers)
        self.trailing_metadata = [(k, v) for k, v in fields if not k.startswith(":")]
        values = dict(fields)
        status = values.get("grpc-status")
        if status is None:
            http = values.get(":status", "")
            code = (
                _HTTP_STATUS.get(int(http), StatusCode.UNKNOWN)
                if http.isdigit() and http != "200"
                else StatusCode.INTERNAL
            )
            self._finish(RpcError(code, "the server sent no grpc-status", self.trailing_metadata))
            return
        details = unquote(values.get("grpc-message", ""), errors="replace")
        if status == "0":
            if self._buffer:
                self._finish(RpcError(StatusCode.INTERNAL, "the response ends inside a message"))
            else:
                self._finish(None)
            return
        try:
            code = StatusCode(int(status))
        except ValueError:
            code = StatusCode.UNKNOWN
        self._finish(RpcError(code, details, self.trailing_metadata))

    def _on_reset(self, error_code: int) -> None:
        self._finish(
            RpcError(
                _RESET_STATUS.get(error_code, StatusCode.INTERNAL),
                f"stream reset by the server ({error_name(error_code)})",
            )
        )


class _Connection(asyncio.Protocol):
    def __init__(self, channel: Channel) -> None:
        self.h2 = H2Connection(client=True, settings=channel.settings)
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.lost = False
        self.draining = False  # GOAWAY received: no new streams here
        self._slot_waiters: list[asyncio.Future[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.h2.initiate()
        self.flush()

    def flush(self) -> None:
        if self.h2.out and self.transport is not None and not self.lost:
            self.transport.write(self.h2.data_to_send())

    def open(self, call: Call, headers: Headers) -> int:
        stream_id = self.h2.send_request(headers)
        self.calls[stream_id] = call
        self.flush()
        return stream_id

    def forget(self, call: Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.flush()
            self._wake_slots()

    async def wait_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        await waiter

    def usable(self) -> bool:
        return not self.lost and not self.draining and not self.h2.closed

    def data_received(self, data: bytes) -> None:
        events = self.h2.receive(data)
        calls = self.calls
        for event in events:
            kind = type(event)
            if kind is Data:
                assert isinstance(event, Data)
                call = calls.get(event.stream_id)
                if call is None:
                    self.h2.acknowledge(event.stream_id, event.flow_length)
                    continue
                call._on_data(event.data, event.flow_length)
                if event.end_stream and not call.done:
                    call._finish(RpcError(StatusCode.INTERNAL, "the server sent no trailers"))
            elif kind is HeadersReceived:
                assert isinstance(event, HeadersReceived)
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_headers(event.headers, event.end_stream)
            elif kind is Trailers:
                assert isinstance(event, Trailers)
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_trailers(event.headers)
            elif kind is WindowUpdated:
                assert isinstance(event, WindowUpdated)
                if event.stream_id:
                    call = calls.get(event.stream_id)
                    if call is not None:
                        call._wake()
                else:
                    for call in list(calls.values()):
                        call._wake()
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                call = calls.get(event.stream_id)
                if call is not None:
                    if event.remote:
                        call._on_reset(event.error_code)
                    else:
                        call._finish(
                            RpcError(
                                StatusCode.INTERNAL,
                                f"the server broke the protocol ({error_name(event.error_code)})",
                            )
                        )
            elif kind is ConnectionTerminated:
                assert isinstance(event, ConnectionTerminated)
                self.draining = True
                if event.error_code or not event.remote:
                    side = "the server" if event.remote else "the client"
                    detail = event.additional_data.decode("utf-8", "replace")
                    self._fail_all(
                        f"{side} ended the connection with GOAWAY "
                        f"{error_name(event.error_code)}" + (f": {detail}" if detail else "")
                    )
                self._wake_slots()
        self.flush()
        if self.h2.closed and self.transport is not None:
            self.transport.close()

    def _wake_slots(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail_all(self, reason: str) -> None:
        for call in list(self.calls.values()):
            call._finish(RpcError(StatusCode.UNAVAILABLE, reason))
        self.calls.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._fail_all(reason)
        self._wake_slots()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.calls.values()):
            call._wake()


class Channel:
    """Calls to one `host:port` over h2c. Close it (or use `async with`) when done."""

    def __init__(
        self,
        target: str,
        *,
        connect_timeout: float = 10.0,
        max_message_length: int = 64 << 20,
        settings: Settings | None = None,
    ) -> None:
        host, colon, port = target.rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise ValueError(f"expected HOST:PORT, got {target!r}")
        self.host = host.strip("[]")
        self.port = int(port)
        self.authority = target.encode()
        self.connect_timeout = connect_timeout
        self.max_message_length = max_message_length
        # Windows sized for config pushes of a few MB without waiting on round trips.
        self.settings = settings or Settings(
            initial_window_size=1 << 20, connection_window=4 << 20, max_concurrent_streams=100
        )
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as error:
            raise RpcError(
                StatusCode.UNAVAILABLE,
                f"cannot connect to {self.authority.decode()}: {error or 'timed out'}",
            ) from None
        return protocol

    async def _stream_slot(self) -> _Connection:
        """A connection that can open a stream now."""
        while True:
            if self._closed:
                raise RpcError(StatusCode.CANCELLED, "the channel is closed")
            connection = self._connection
            if connection is None or not connection.usable():
                if self._connecting is None:
                    self._connecting = asyncio.ensure_future(self._connect())
                connecting = self._connecting
                try:
                    connection = await asyncio.shield(connecting)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed and not (task and task.cancelling()):
                        raise RpcError(StatusCode.CANCELLED, "the channel is closed") from None
                    raise
                finally:
                    if self._connecting is connecting and connecting.done():
                        self._connecting = None
                self._connection = connection
                if self._closed:
                    self._discard(connection)
                    continue
            if connection.h2.open_stream_allowed():
                return connection
            await connection.wait_slot()

    def _discard(self, connection: _Connection) -> None:
        if connection.transport is not None and not connection.lost:
            connection.h2.close()
            connection.flush()
            connection.transport.close()

    def stream(self, method: str, *, timeout: float | None = None, metadata: Metadata = ()) -> Call:
        """A streaming call (requests via `send`/`done_writing`, responses by iterating)."""
        return Call(self, method, timeout, metadata)

    async def unary(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109  # the call's gRPC deadline
        metadata: Metadata = (),
    ) -> bytes:
        call = Call(self, method, timeout, metadata)
        try:
            await call.send(request)
            await call.done_writing()
            reply = await call.recv()
            if reply is None:
                raise RpcError(StatusCode.INTERNAL, "the server sent no response message")
            if await call.recv() is not None:
                raise RpcError(StatusCode.INTERNAL, "the server sent more than one response")
            return reply
        finally:
            call.cancel()

    async def close(self) -> None:
        """End every call (CANCELLED) and the connection (GOAWAY, then close)."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        connection = self._connection
        self._connection = None
        if connection is not None:
            for call in list(connection.calls.values()):
                call.cancel()
            self._discard(connection)
