"""HTTP/2 error codes (RFC 9113 §7) and the exceptions the codec raises to its caller."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "H2Error", "StreamClosedError", "TooManyStreamsError", "error_name"]


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error 0x{code:x}"


class H2Error(Exception):
    """A call the connection's state does not allow (the caller's mistake, not the peer's)."""


class StreamClosedError(H2Error):
    """The stream is unknown, closed or already ended on our side."""


class TooManyStreamsError(H2Error):
    """Opening a stream now would exceed the peer's SETTINGS_MAX_CONCURRENT_STREAMS, or the
    peer sent GOAWAY: wait for a stream to end, or use another connection."""
