"""HTTP/2 (RFC 9113) and HPACK (RFC 7541), sans-io, built for a proxy's hot path.

`H2Connection` is the codec (bytes in, events out, frames into one buffer the caller drains);
`istio.http2.grpc` is an asyncio gRPC client on it. docs/http2.md describes the API and the
protections against abusive peers.
"""

from istio.http2.connection import PREFACE, H2Connection, Limits, Settings, Stream
from istio.http2.errors import (
    ErrorCode,
    H2Error,
    StreamClosedError,
    TooManyStreamsError,
    error_name,
)
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
from istio.http2.hpack import Headers

__all__ = [
    "PREFACE",
    "ConnectionTerminated",
    "Data",
    "ErrorCode",
    "Event",
    "H2Connection",
    "H2Error",
    "Headers",
    "HeadersReceived",
    "Informational",
    "Limits",
    "PingAcked",
    "PingReceived",
    "Settings",
    "SettingsAcked",
    "SettingsChanged",
    "Stream",
    "StreamClosedError",
    "StreamReset",
    "TooManyStreamsError",
    "Trailers",
    "WindowUpdated",
    "error_name",
]
