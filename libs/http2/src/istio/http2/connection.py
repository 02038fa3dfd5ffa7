"""An HTTP/2 connection (RFC 9113), sans-io, for either role.

Theory of operation. The caller feeds received bytes to `receive`, which parses whole frames
straight out of them (a partial frame waits in a small buffer), updates the connection and
stream state, and returns a list of events. Everything the connection has to send (frames the
caller asked for with `send_*`, and the codec's own replies: SETTINGS and PING
acknowledgements, WINDOW_UPDATE, RST_STREAM, GOAWAY) is appended to one bytearray that the
caller drains with `data_to_send`. Nothing here blocks, sleeps or touches a socket.

Streams. A stream lives in `streams` from its first HEADERS until both sides have ended it or
it is reset; `local_closed`/`remote_closed` give the half-closed states of §5.1, an absent
stream is idle (id above the last one opened) or closed. Priority (§5.3) is parsed and ignored.
Push is never enabled: PUSH_PROMISE is a PROTOCOL_ERROR.

Flow control. Sending: `send_data` always takes the bytes; what the peer's windows do not allow
yet waits on the stream (`pending`) and goes out, in order, as WINDOW_UPDATE frames arrive
(`WindowUpdated` events tell the caller, who reads `pending` to apply backpressure upstream).
Receiving: window credit goes back to the peer only when the caller `acknowledge`s what it has
consumed, in batches of half a window, so a slow consumer stops a fast sender.

Protections. Peer errors that concern the whole connection send GOAWAY and stop the codec
(`ConnectionTerminated(remote=False)`): malformed frames (PROTOCOL_ERROR, FRAME_SIZE_ERROR),
HPACK errors (COMPRESSION_ERROR), header lists over SETTINGS_MAX_HEADER_LIST_SIZE, CONTINUATION
floods, resets beyond a rate (CVE-2023-44487's rapid reset), PING/SETTINGS floods and replies
piling up undrained (ENHANCE_YOUR_CALM). Errors confined to a stream (malformed header lists,
content-length mismatch, streams beyond SETTINGS_MAX_CONCURRENT_STREAMS) reset that stream.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from istio.http2.errors import ErrorCode, H2Error, StreamClosedError, TooManyStreamsError
from istio.http2.events import (
    ConnectionTerminated,
    Data,
    Event,
    HeadersReceived,
    Informational,
    PingAcked,
    PingReceived,
    SettingsAcked,
    SettingsChanged,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from istio.http2.hpack import Decoder, Encoder, HeaderListTooLarge, Headers, HPACKError

__all__ = ["PREFACE", "H2Connection", "Limits", "Settings", "Stream"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

FLAG_END_STREAM = FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8

DEFAULT_WINDOW = 65535
MAX_WINDOW = (1 << 31) - 1
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = (1 << 24) - 1

# length (24 bits as 8 + 16), type, flags, stream id
_FRAME = struct.Struct(">BHBBL")
_pack_frame = _FRAME.pack
_unpack_frame = _FRAME.unpack_from
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")

# RFC 9113 §8.2.2: connection-specific fields make a message malformed.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


@dataclass(frozen=True, slots=True)
class Settings:
    """What this endpoint advertises, plus the connection window it opens at start."""

    header_table_size: int = 4096
    max_concurrent_streams: int = 100
    initial_window_size: int = DEFAULT_WINDOW
    max_frame_size: int = DEFAULT_MAX_FRAME
    max_header_list_size: int = 65536
    connection_window: int = 1 << 20

    def __post_init__(self) -> None:
        # Below the protocol defaults the peer could overrun us lawfully until it has
        # acknowledged our SETTINGS, so those are the floors.
        if self.header_table_size < 4096:
            raise ValueError("header_table_size below 4096 is not supported")
        if not DEFAULT_WINDOW <= self.initial_window_size <= MAX_WINDOW:
            raise ValueError(f"initial_window_size must be {DEFAULT_WINDOW}..{MAX_WINDOW}")
        if not DEFAULT_WINDOW <= self.connection_window <= MAX_WINDOW:
            raise ValueError(f"connection_window must be {DEFAULT_WINDOW}..{MAX_WINDOW}")
        if not DEFAULT_MAX_FRAME <= self.max_frame_size <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_size must be {DEFAULT_MAX_FRAME}..{MAX_FRAME_LIMIT}")
        if self.max_concurrent_streams < 1 or self.max_header_list_size < 1:
            raise ValueError("max_concurrent_streams and max_header_list_size must be positive")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may make this endpoint do (see docs/http2.md, Protections)."""

    # A header block may span this many CONTINUATION frames (CVE-2024-27316's flood).
    max_continuation_frames: int = 64
    # Peer resets (and streams we refuse) allowed in a burst, then per second: rapid reset.
    reset_burst: int = 1000
    reset_rate: float = 33.0
    # PING and SETTINGS frames (the ones we must answer) in a burst, then per second.
    control_burst: int = 1000
    control_rate: float = 100.0
    # Replies (ACKs, RST_STREAM) the codec queued that the caller has not drained yet.
    max_pending_replies: int = 1000
    # Streams we reset whose late frames are still ignored rather than errors (§5.4.2).
    remembered_resets: int = 1024


class Stream:
    """One stream's state. `pending` is data waiting for send credit."""

    __slots__ = (
        "content_length",
        "end_pending",
        "head",
        "id",
        "local_closed",
        "pending",
        "received",
        "recv_window",
        "remote_closed",
        "response_started",
        "send_window",
        "trailers_pending",
        "unacknowledged",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacknowledged = 0
        self.pending = bytearray()
        self.end_pending = False  # END_STREAM queued behind `pending`
        self.trailers_pending: Headers | None = None
        self.local_closed = False  # END_STREAM sent
        self.remote_closed = False  # END_STREAM received
        self.response_started = False  # the peer's final headers (client role) / request seen
        self.content_length = -1
        self.received = 0
        self.head = False  # a HEAD request: the response's content-length describes nothing


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2Connection:
    def __init__(
        self,
        *,
        client: bool,
        settings: Settings | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.local = settings or Settings()
        self.limits = limits or Limits()
        self._clock = clock
        self.streams: dict[int, Stream] = {}
        self.out = bytearray()
        self.encoder = Encoder()
        self.decoder = Decoder(
            self.local.header_table_size, max_header_list_size=self.local.max_header_list_size
        )
        # The peer's settings, RFC defaults until its SETTINGS frame arrives.
        self.remote_max_concurrent_streams = MAX_WINDOW
        self.remote_initial_window = DEFAULT_WINDOW
        self.remote_max_frame_size = DEFAULT_MAX_FRAME
        self.remote_max_header_list_size = MAX_WINDOW
        self.remote_settings_received = False
        # Connection windows: what we may send, what the peer may still send.
        self.send_window = DEFAULT_WINDOW
        self.recv_window = DEFAULT_WINDOW
        self._recv_target = DEFAULT_WINDOW
        self.unacknowledged = 0  # consumed (or padding) bytes whose credit is not yet returned
        self.next_stream_id = 1 if client else 2
        self.highest_remote_id = 0
        self.local_open = 0  # streams we opened that are still in `streams`
        self.remote_open = 0
        self.goaway_received: int | None = None  # the peer's last-stream-id
        self.goaway_sent: int | None = None
        self.closed = False  # a connection error was sent or the codec was closed
        self._buffer = b""
        self._expect_preface = not client
        self._expect_settings = True
        self._block: bytearray | None = None  # header block being assembled
        self._block_stream = 0
        self._block_end_stream = False
        self._block_self_dependent = False
        self._block_frames = 0
        self._block_limit = self.local.max_header_list_size + self.local.max_frame_size
        self._blocked: dict[int, Stream] = {}  # streams with pending data, in arrival order
        self._ignored: dict[int, None] = {}
        self._reset_tokens = float(self.limits.reset_burst)
        self._reset_time = clock()
        self._control_tokens = float(self.limits.control_burst)
        self._control_time = self._reset_time
        self._replies = 0
        self._events: list[Event] = []

    # -- starting, draining ---------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface: the client magic (client role), our SETTINGS, and a
        WINDOW_UPDATE opening the connection window to `Settings.connection_window`."""
        local = self.local
        entries = [(SETTINGS_MAX_CONCURRENT_STREAMS, local.max_concurrent_streams)]
        if self.client:
            self.out += PREFACE
            entries.append((SETTINGS_ENABLE_PUSH, 0))
        if local.header_table_size != 4096:
            entries.append((SETTINGS_HEADER_TABLE_SIZE, local.header_table_size))
        if local.initial_window_size != DEFAULT_WINDOW:
            entries.append((SETTINGS_INITIAL_WINDOW_SIZE, local.initial_window_size))
        if local.max_frame_size != DEFAULT_MAX_FRAME:
            entries.append((SETTINGS_MAX_FRAME_SIZE, local.max_frame_size))
        entries.append((SETTINGS_MAX_HEADER_LIST_SIZE, local.max_header_list_size))
        payload = b"".join(_SETTING.pack(key, value) for key, value in entries)
        self._frame(SETTINGS, 0, 0, payload)
        if local.connection_window > DEFAULT_WINDOW:
            increment = local.connection_window - DEFAULT_WINDOW
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))
            self.recv_window += increment
            self._recv_target = local.connection_window

    def data_to_send(self) -> bytes:
        """Everything queued since the last call (the caller writes it to the transport)."""
        data = bytes(self.out)
        self.out.clear()
        self._replies = 0
        return data

    # -- sending ----------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        length = len(payload)
        self.out += _pack_frame(length >> 16, length & 0xFFFF, kind, flags, stream_id)
        if payload:
            self.out += payload

    def open_stream_allowed(self) -> bool:
        return (
            not self.closed
            and self.goaway_received is None
            and self.local_open < self.remote_max_concurrent_streams
            and self.next_stream_id <= MAX_WINDOW
        )

    def send_request(self, headers: Headers, end_stream: bool = False) -> int:
        """Open a stream with these headers (client role); returns its id."""
        if not self.client:
            raise H2Error("only a client opens streams (push is never enabled)")
        if not self.open_stream_allowed():
            raise TooManyStreamsError(
                "the peer sent GOAWAY"
                if self.goaway_received is not None or self.closed
                else f"{self.local_open} streams open, the peer allows "
                f"{self.remote_max_concurrent_streams}"
            )
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        stream = Stream(stream_id, self.remote_initial_window, self.local.initial_window_size)
        stream.response_started = False
        stream.head = (b":method", b"HEAD") in headers
        self.streams[stream_id] = stream
        self.local_open += 1
        self._headers(stream, headers, end_stream)
        return stream_id

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """Response headers (server role; several for 1xx), or trailers (end_stream=True)
        on either side. Trailers wait behind data still pending on the stream."""
        stream = self._sendable(stream_id)
        if stream.pending:
            if not end_stream:
                raise H2Error("only trailers (end_stream=True) may follow queued data")
            stream.trailers_pending = headers
            stream.end_pending = True
            return
        self._headers(stream, headers, end_stream)

    def _sendable(self, stream_id: int) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is not open")
        if stream.local_closed or stream.end_pending:
            raise StreamClosedError(f"stream {stream_id} is already ended on our side")
        return stream

    def _headers(self, stream: Stream, headers: Headers, end_stream: bool) -> None:
        block = self.encoder.encode(headers)
        flags = FLAG_END_STREAM if end_stream else 0
        limit = self.remote_max_frame_size
        out = self.out
        length = len(block)
        if length <= limit:
            out += _pack_frame(length >> 16, length & 0xFFFF, HEADERS, flags | 4, stream.id)
            out += block
        else:
            self._frame(HEADERS, flags, stream.id, block[:limit])
            for start in range(limit, length, limit):
                last = start + limit >= length
                self._frame(CONTINUATION, 4 if last else 0, stream.id, block[start : start + limit])
        if end_stream:
            self._end_local(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes; what exceeds the peer's windows is queued on the stream (see
        `pending`) and sent as credit arrives."""
        stream = self._sendable(stream_id)
        length = len(data)
        if (
            not stream.pending
            and length <= self.send_window
            and length <= stream.send_window
            and length <= self.remote_max_frame_size
        ):
            self.out += _pack_frame(
                length >> 16, length & 0xFFFF, DATA, FLAG_END_STREAM if end_stream else 0, stream_id
            )
            self.out += data
            self.send_window -= length
            stream.send_window -= length
            if end_stream:
                self._end_local(stream)
            return
        stream.pending += data
        stream.end_pending = end_stream
        self._flush(stream)

    def end_stream(self, stream_id: int) -> None:
        """End our side of the stream (an empty DATA frame with END_STREAM, after pending)."""
        self.send_data(stream_id, b"", end_stream=True)

    def pending(self, stream_id: int) -> int:
        """Bytes queued on the stream waiting for send credit (0 for unknown streams)."""
        stream = self.streams.get(stream_id)
        return len(stream.pending) if stream is not None else 0

    def _flush(self, stream: Stream) -> None:
        pending = stream.pending
        limit = self.remote_max_frame_size
        while pending:
            size = min(len(pending), self.send_window, stream.send_window, limit)
            if size <= 0:
                self._blocked[stream.id] = stream
                return
            last = size == len(pending) and stream.end_pending and stream.trailers_pending is None
            self._frame(DATA, FLAG_END_STREAM if last else 0, stream.id, bytes(pending[:size]))
            del pending[:size]
            self.send_window -= size
            stream.send_window -= size
            if last:
                self._blocked.pop(stream.id, None)
                self._end_local(stream)
                return
        self._blocked.pop(stream.id, None)
        if stream.trailers_pending is not None:
            trailers, stream.trailers_pending = stream.trailers_pending, None
            self._headers(stream, trailers, True)
        elif stream.end_pending and not stream.local_closed:
            self._frame(DATA, FLAG_END_STREAM, stream.id)
            self._end_local(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._flush(stream)

    def _end_local(self, stream: Stream) -> None:
        stream.local_closed = True
        stream.end_pending = False
        if stream.remote_closed:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if (stream.id & 1) == self.client:
            self.local_open -= 1
        else:
            self.remote_open -= 1
        self._blocked.pop(stream.id, None)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM; pending data is dropped. Unknown or closed streams are ignored."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._forget(stream)
        self._send_reset(stream_id, error_code)

    def _send_reset(self, stream_id: int, error_code: int) -> None:
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))
        self._remember_ignored(stream_id)

    def _remember_ignored(self, stream_id: int) -> None:
        """Frames the peer sent before it learnt of our reset (or GOAWAY) are ignored."""
        ignored = self._ignored
        ignored[stream_id] = None
        if len(ignored) > self.limits.remembered_resets:
            del ignored[next(iter(ignored))]

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The caller consumed `length` flow-controlled bytes of the stream: return the credit
        to the peer (in batches, once half a window is due)."""
        if length <= 0:
            return
        self.unacknowledged += length
        if self.unacknowledged >= self._recv_target >> 1:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacknowledged))
            self.recv_window += self.unacknowledged
            self.unacknowledged = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacknowledged += length
        if stream.unacknowledged >= self.local.initial_window_size >> 1:
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacknowledged))
            stream.recv_window += stream.unacknowledged
            stream.unacknowledged = 0

    def ping(self, data: bytes = b"\0" * 8) -> None:
        if len(data) != 8:
            raise ValueError("PING carries exactly 8 bytes")
        self._frame(PING, 0, 0, data)

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: bytes = b"") -> None:
        """GOAWAY: streams the peer opened up to now still complete; new ones are ignored."""
        if self.goaway_sent is None or error_code:
            self.goaway_sent = self.highest_remote_id
            self._frame(
                GOAWAY, 0, 0, _U32.pack(self.highest_remote_id) + _U32.pack(error_code) + message
            )
        if error_code:
            self.closed = True

    # -- receiving --------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Process bytes from the peer; returns the events they caused."""
        events: list[Event] = []
        if self.closed:
            return events
        self._events = events
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        position = 0
        end = len(data)
        try:
            if self._expect_preface:
                if end < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise _ConnectionError(
                            ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface"
                        )
                    self._buffer = data
                    return events
                if not data.startswith(PREFACE):
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface"
                    )
                self._expect_preface = False
                position = len(PREFACE)
            max_frame = self.local.max_frame_size
            while end - position >= 9:
                high, low, kind, flags, stream_id = _unpack_frame(data, position)
                length = high << 16 | low
                if length > max_frame:
                    raise _ConnectionError(
                        ErrorCode.FRAME_SIZE_ERROR,
                        f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max_frame}",
                    )
                stop = position + 9 + length
                if stop > end:
                    break
                payload = data[position + 9 : stop]
                position = stop
                stream_id &= MAX_WINDOW
                if self._block is not None and kind != CONTINUATION:
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame"
                    )
                if self._expect_settings:
                    if kind != SETTINGS or flags & FLAG_ACK:
                        raise _ConnectionError(
                            ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS"
                        )
                    self._expect_settings = False
                if kind == DATA:
                    self._on_data(flags, stream_id, payload)
                elif kind == HEADERS:
                    self._on_headers(flags, stream_id, payload)
                elif kind < len(_HANDLERS):
                    _HANDLERS[kind](self, flags, stream_id, payload)
                # Unknown frame types are ignored (§4.1, §5.5).
                if self.closed:
                    return events
            if self._replies > self.limits.max_pending_replies:
                raise _ConnectionError(
                    ErrorCode.ENHANCE_YOUR_CALM, "the peer makes us queue too many replies"
                )
        except _ConnectionError as error:
            self._fail(error.code, str(error))
            return events
        if position < end:
            self._buffer = data[position:]
        return events

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.close(code, message.encode()[:256])
        self.closed = True
        self._buffer = b""
        self._events.append(
            ConnectionTerminated(code, self.highest_remote_id, message.encode(), False)
        )

    def _stream_error(self, stream_id: int, code: ErrorCode, known: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._forget(stream)
        self._send_reset(stream_id, code)
        self._replies += 1
        if known:
            self._events.append(StreamReset(stream_id, code, False))

    def _closed_or_idle(self, stream_id: int) -> bool:
        """True for a closed stream, False for an idle one (never opened)."""
        if (stream_id & 1) == self.client:
            return stream_id < self.next_stream_id
        return stream_id <= self.highest_remote_id

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        data = payload
        if flags & FLAG_PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA padding exceeds the frame")
            data = payload[1 : length - payload[0]]
        self.recv_window -= length
        if self.recv_window < 0:
            raise _ConnectionError(
                ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection's flow-control window"
            )
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed or not stream.response_started:
            # The caller never sees these bytes, so the connection credit comes back now.
            self.acknowledge(0, length)
            if stream is not None:
                code = ErrorCode.STREAM_CLOSED if stream.remote_closed else ErrorCode.PROTOCOL_ERROR
                self._stream_error(stream_id, code, True)
            elif not self._closed_or_idle(stream_id):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            elif stream_id not in self._ignored:
                self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, False)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self.acknowledge(0, length)
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, True)
            return
        padding = length - len(data)
        if padding:
            self.acknowledge(stream_id, padding)
        stream.received += len(data)
        end_stream = bool(flags & FLAG_END_STREAM)
        if stream.content_length >= 0 and (
            stream.received > stream.content_length
            or (end_stream and stream.received != stream.content_length)
        ):
            self.acknowledge(0, len(data))
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, True)
            return
        self._events.append(Data(stream_id, data, end_stream, len(data)))
        if end_stream:
            stream.remote_closed = True
            if stream.local_closed:
                self._forget(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        stop = len(payload)
        if flags & FLAG_PADDED:
            if not stop:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding exceeds frame")
            start = 1
            stop -= payload[0]
        self_dependent = False
        if flags & FLAG_PRIORITY:
            if stop - start < 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS priority truncated")
            self_dependent = (_U32.unpack_from(payload, start)[0] & MAX_WINDOW) == stream_id
            start += 5
        if stop < start:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding exceeds frame")
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._on_header_block(stream_id, payload[start:stop], end_stream, self_dependent)
            return
        self._block = bytearray(payload[start:stop])
        self._block_stream = stream_id
        self._block_end_stream = end_stream
        self._block_frames = 0
        self._block_self_dependent = self_dependent

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._block
        if block is None or stream_id != self._block_stream:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block_frames += 1
        block += payload
        if self._block_frames > self.limits.max_continuation_frames:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, "header block spans too many CONTINUATION frames"
            )
        if len(block) > self._block_limit:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, "header block exceeds SETTINGS_MAX_HEADER_LIST_SIZE"
            )
        if flags & FLAG_END_HEADERS:
            self._block = None
            self._on_header_block(
                stream_id, bytes(block), self._block_end_stream, self._block_self_dependent
            )

    def _on_header_block(
        self, stream_id: int, block: bytes, end_stream: bool, self_dependent: bool
    ) -> None:
        try:
            headers = self.decoder.decode(block)
        except HeaderListTooLarge as error:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, str(error)) from None
        except HPACKError as error:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, str(error)) from None
        stream = self.streams.get(stream_id)
        known = stream is not None  # whether the caller has heard of the stream
        if stream is None:
            if (stream_id & 1) == self.client:
                if stream_id < self.next_stream_id and stream_id in self._ignored:
                    return
                raise _ConnectionError(
                    ErrorCode.PROTOCOL_ERROR
                    if stream_id >= self.next_stream_id
                    else ErrorCode.STREAM_CLOSED,
                    f"HEADERS on stream {stream_id}, which we did not open or is closed",
                )
            if stream_id <= self.highest_remote_id:
                if stream_id in self._ignored:
                    return
                raise _ConnectionError(
                    ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {stream_id}"
                )
            if self.client:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "server-initiated stream")
            self.highest_remote_id = stream_id
            if self.goaway_sent is not None and stream_id > self.goaway_sent:
                self._remember_ignored(stream_id)  # after our GOAWAY: ignored, §6.8
                return
            if self.remote_open >= self.local.max_concurrent_streams:
                self._spend_reset()
                self._stream_error(stream_id, ErrorCode.REFUSED_STREAM, False)
                return
            stream = Stream(stream_id, self.remote_initial_window, self.local.initial_window_size)
            self.streams[stream_id] = stream
            self.remote_open += 1
        elif stream.remote_closed:
            self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, True)
            return
        if self_dependent or self.decoder.invalid is not None:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, known)
            return
        events = self._events
        if stream.response_started:  # trailers
            if (
                not end_stream
                or not _trailers_ok(headers)
                or (stream.content_length >= 0 and stream.received != stream.content_length)
            ):
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, True)
                return
            events.append(Trailers(stream_id, headers))
        elif self.client:
            status, length = _response_status(headers)
            if status < 0 or (status < 200 and end_stream):
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, True)
                return
            if status < 200:
                events.append(Informational(stream_id, headers))
                return
            stream.response_started = True
            if not stream.head and status != 304 and status != 204:
                if end_stream and length > 0:
                    self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, True)
                    return
                stream.content_length = length
            events.append(HeadersReceived(stream_id, headers, end_stream))
        else:
            length = _request_length(headers)
            if length == _MALFORMED or (end_stream and length > 0):
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, False)
                return
            stream.content_length = length
            stream.response_started = True
            events.append(HeadersReceived(stream_id, headers, end_stream))
        if end_stream:
            stream.remote_closed = True
            if stream.local_closed:
                self._forget(stream)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(stream_id, ErrorCode.FRAME_SIZE_ERROR, stream_id in self.streams)
            return
        if (_U32.unpack_from(payload)[0] & MAX_WINDOW) == stream_id:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, stream_id in self.streams)

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self._closed_or_idle(stream_id):
                raise _ConnectionError(
                    ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}"
                )
            return
        self._forget(stream)
        self._spend_reset()
        self._events.append(StreamReset(stream_id, _U32.unpack(payload)[0], True))

    def _spend_reset(self) -> None:
        now = self._clock()
        limits = self.limits
        tokens = min(
            float(limits.reset_burst),
            self._reset_tokens + (now - self._reset_time) * limits.reset_rate,
        )
        self._reset_time = now
        if tokens < 1:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset or refused (rapid reset)"
            )
        self._reset_tokens = tokens - 1

    def _spend_control(self) -> None:
        now = self._clock()
        limits = self.limits
        tokens = min(
            float(limits.control_burst),
            self._control_tokens + (now - self._control_time) * limits.control_rate,
        )
        self._control_time = now
        if tokens < 1:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "PING or SETTINGS flood")
        self._control_tokens = tokens - 1
        self._replies += 1

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._events.append(SettingsAcked())
            return
        if len(payload) % 6:
            raise _ConnectionError(
                ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6"
            )
        self._spend_control()
        changed: dict[int, int] = {}
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.set_max_table_size(value)
            elif key == SETTINGS_ENABLE_PUSH:
                if value > 1 or (value and self.client):
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2**31-1"
                    )
                delta = value - self.remote_initial_window
                self.remote_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(
                            ErrorCode.FLOW_CONTROL_ERROR, "stream window above 2**31-1"
                        )
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range"
                    )
                self.remote_max_frame_size = value
            elif key == SETTINGS_MAX_HEADER_LIST_SIZE:
                self.remote_max_header_list_size = value
            changed[key] = value
        self.remote_settings_received = True
        self._frame(SETTINGS, FLAG_ACK, 0)
        self._events.append(SettingsChanged(changed))
        if self._blocked:
            self._flush_blocked()

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, but push is disabled")

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING must be 8 bytes")
        if flags & FLAG_ACK:
            self._events.append(PingAcked(payload))
            return
        self._spend_control()
        self._frame(PING, FLAG_ACK, 0, payload)
        self._events.append(PingReceived(payload))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last = _U32.unpack_from(payload)[0] & MAX_WINDOW
        code = _U32.unpack_from(payload, 4)[0]
        self.goaway_received = last
        for stream in list(self.streams.values()):
            if (stream.id & 1) == self.client and stream.id > last:
                self._forget(stream)
                self._events.append(StreamReset(stream.id, ErrorCode.REFUSED_STREAM, True))
        self._events.append(ConnectionTerminated(code, last, payload[8:], True))

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if not increment:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(
                    ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2**31-1"
                )
            if self._blocked:
                self._flush_blocked()
            self._events.append(WindowUpdated(0, increment))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self._closed_or_idle(stream_id):
                raise _ConnectionError(
                    ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}"
                )
            return
        if not increment:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, True)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, True)
            return
        if stream.pending or stream.end_pending:
            self._flush(stream)
        self._events.append(WindowUpdated(stream_id, increment))


_REQUEST_PSEUDO = {b":method": 1, b":scheme": 2, b":authority": 4, b":path": 8}
_MALFORMED = -2


def _regular_ok(name: bytes, value: bytes) -> bool:
    if name in _CONNECTION_SPECIFIC:
        return False
    return name != b"te" or value == b"trailers"


def _content_length(value: bytes, length: int) -> int:
    """Fold one content-length field into what earlier ones said (-1: none yet)."""
    if not value.isdigit():
        return _MALFORMED
    number = int(value)
    return number if length in (-1, number) else _MALFORMED


def _request_length(headers: Headers) -> int:
    """The content-length of a valid request header list, -1 without one, or _MALFORMED.

    RFC 9113 §8.3.1: pseudo-headers first, each at most once; :method; :scheme and a
    :path (origin-form or *) unless CONNECT (which needs :authority and neither of those); no
    connection-specific field; te only "trailers".
    """
    seen = 0
    regular = False
    method = b""
    length = -1
    for name, value in headers:
        if name[0] == 58:
            bit = _REQUEST_PSEUDO.get(name, 0)
            if regular or not bit or seen & bit:
                return _MALFORMED
            seen |= bit
            if bit == 1:
                method = value
            elif bit == 8 and value[:1] != b"/" and value != b"*":
                return _MALFORMED  # as nghttp2: origin-form, or * (OPTIONS)
        else:
            regular = True
            if name == b"content-length":
                length = _content_length(value, length)
                if length == _MALFORMED:
                    return length
            elif not _regular_ok(name, value):
                return _MALFORMED
    if method == b"CONNECT":
        return length if seen == 5 else _MALFORMED
    return length if method and seen & 10 == 10 else _MALFORMED


def _response_status(headers: Headers) -> tuple[int, int]:
    """(:status, content-length or -1) of a valid response header list; (-1, 0) when
    malformed (§8.3.2)."""
    status = -1
    regular = False
    length = -1
    for name, value in headers:
        if name[0] == 58:
            if regular or name != b":status" or status != -1:
                return -1, 0
            if len(value) != 3 or not value.isdigit() or value[0] == 48 or value == b"101":
                return -1, 0  # 101 Switching Protocols does not exist in HTTP/2 (§8.6)
            status = int(value)
        else:
            regular = True
            if name == b"content-length":
                length = _content_length(value, length)
                if length == _MALFORMED:
                    return -1, 0
            elif not _regular_ok(name, value):
                return -1, 0
    return status, length


def _trailers_ok(headers: Headers) -> bool:
    return all(name[0] != 58 and _regular_ok(name, value) for name, value in headers)


_HANDLERS: tuple[Callable[[H2Connection, int, int, bytes], None], ...] = (
    H2Connection._on_data,
    H2Connection._on_headers,
    H2Connection._on_priority,
    H2Connection._on_rst_stream,
    H2Connection._on_settings,
    H2Connection._on_push_promise,
    H2Connection._on_ping,
    H2Connection._on_goaway,
    H2Connection._on_window_update,
    H2Connection._on_continuation,
)
