"""What `H2Connection.receive` returns: small slotted records, one per thing that happened.

Dispatch on `type(event) is Data` (or `match`): events carry no behaviour.
"""

from __future__ import annotations

from istio.http2.hpack import Headers

__all__ = [
    "ConnectionTerminated",
    "Data",
    "Event",
    "HeadersReceived",
    "Informational",
    "PingAcked",
    "PingReceived",
    "SettingsAcked",
    "SettingsChanged",
    "StreamReset",
    "Trailers",
    "WindowUpdated",
]


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        names: tuple[str, ...] = self.__slots__
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in names
        )

    __hash__ = None  # type: ignore[assignment]


class HeadersReceived(Event):
    """A request's headers (server role) or a final response's (client role)."""

    __slots__ = ("end_stream", "headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class Informational(Event):
    """A 1xx response (client role); the final response follows."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class Trailers(Event):
    """Trailing headers; the peer's side of the stream ends with them."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class Data(Event):
    """Body bytes. `flow_length` is what the caller hands back to `acknowledge` once it has
    consumed them (padding is acknowledged by the codec itself)."""

    __slots__ = ("data", "end_stream", "flow_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes, end_stream: bool, flow_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.end_stream = end_stream
        self.flow_length = flow_length


class StreamReset(Event):
    """The stream is gone: reset by the peer (`remote`), or by the codec because the peer broke
    the protocol on it, or refused by the peer's GOAWAY (REFUSED_STREAM: never processed, safe
    to retry)."""

    __slots__ = ("error_code", "remote", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated(Event):
    """The peer granted send credit (stream 0: the connection); queued data went out."""

    __slots__ = ("delta", "stream_id")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class SettingsChanged(Event):
    """The peer's SETTINGS, applied and acknowledged: identifier -> value."""

    __slots__ = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


class SettingsAcked(Event):
    __slots__ = ()


class PingReceived(Event):
    """The peer's PING (already answered)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class PingAcked(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class ConnectionTerminated(Event):
    """GOAWAY, received (`remote`) or sent by the codec for a connection error. After a local
    one the codec ignores further input: flush `data_to_send()` and close the transport."""

    __slots__ = ("additional_data", "error_code", "last_stream_id", "remote")

    def __init__(
        self, error_code: int, last_stream_id: int, additional_data: bytes, remote: bool
    ) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data
        self.remote = remote
