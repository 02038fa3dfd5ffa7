"""Redis RESP stats, sans-io: the bytes of both directions of a connection are fed in as they
pass; the parser never changes or holds them back, it only counts.

Requests are RESP arrays of bulk strings (or inline commands, one line each); replies are any
RESP2 or RESP3 value. Replies answer commands in order, so each complete reply is matched to
the oldest command waiting for one (pipelining works unchanged) and gives that command its
latency and its outcome (an error reply, `-...` or RESP3 `!...`, counts as an error).

Bulk payloads are skipped as they stream past, never buffered: only a line (a header or a
simple value) and the first few small bulk strings of a request (the command name and its
subcommand) are kept, so memory per connection stays small whatever the values' sizes.

Where replies stop answering commands one for one (SUBSCRIBE and friends, MONITOR, CLIENT REPLY
OFF|SKIP), matching stops: commands are still counted, latencies no longer. Bytes that are not
RESP stop the parser for good (`decoding_error`); the connection carries on untouched.
"""

from __future__ import annotations

import re
from collections import deque

from istio.proxy.stats import ProtocolStats

MAX_LINE = 64 * 1024  # a RESP line (header, simple string, inline command) longer: not RESP
MAX_BULK = 512 * 1024 * 1024  # Redis's proto-max-bulk-len default
MAX_ELEMENTS = 1 << 31
MAX_DEPTH = 64
MAX_WAITING = 100_000  # commands waiting for replies before matching gives up
_CAPTURE = 3  # request elements kept: the command, its subcommand, one more
_CAPTURE_BYTES = 64
_SCALARS = frozenset(b"+-:,#(_")  # one-line values
_BLOBS = frozenset(b"$!=")  # length-prefixed values
_AGGREGATES = frozenset(b"*~>")  # n elements
_PAIRS = frozenset(b"%|")  # n pairs
_ERRORS = frozenset(b"-!")
_UNMATCHED = frozenset(
    {"subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "monitor"}
)
_INLINE = re.compile(rb"[A-Za-z][A-Za-z0-9_.|-]{0,63}")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.|")


class ProtocolError(ValueError):
    pass


class RespReader:
    """Splits a byte stream into complete top-level RESP values, as (type byte, first small
    strings of the value when it is an array or an inline command)."""

    def __init__(self, *, requests: bool) -> None:
        self.requests = requests
        self.buffer = bytearray()
        self.skip = 0  # payload bytes (and CRLF) of the current bulk string still to come
        self.capturing = False
        self.stack: list[int] = []  # elements still to come in each open aggregate
        self.kind = 0  # type byte of the top-level value being read
        self.captured: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, list[bytes]]]:
        values: list[tuple[int, list[bytes]]] = []
        skip = self.skip
        if skip and not self.buffer and not self.capturing and len(data) <= skip:
            self.skip = skip - len(data)  # the middle of a large value: nothing to look at
            if not self.skip:
                self._done(values)
            return values
        buffer = self.buffer
        buffer += data
        position = 0
        end = len(buffer)
        while position < end:
            if self.skip:
                take = min(self.skip, end - position)
                if self.capturing:
                    self.captured[-1] += buffer[position : position + take]
                position += take
                self.skip -= take
                if self.skip:
                    break
                if self.capturing:
                    self.capturing = False
                    value = self.captured[-1]
                    if not value.endswith(b"\r\n"):
                        raise ProtocolError("bulk string without CRLF")
                    self.captured[-1] = value[:-2]
                self._done(values)
                continue
            newline = buffer.find(b"\r\n", position)
            if newline < 0:
                if end - position > MAX_LINE:
                    raise ProtocolError("line too long")
                break
            line = bytes(buffer[position:newline])
            position = newline + 2
            self._line(line, values)
        del buffer[:position]
        return values

    def _line(self, line: bytes, values: list[tuple[int, list[bytes]]]) -> None:
        top = not self.stack
        if not line:
            if top and self.requests:
                return  # an empty inline command: Redis ignores it
            raise ProtocolError("empty line")
        kind = line[0]
        if top:
            self.kind = kind
            self.captured = []
        if self.requests and top and kind != 0x2A:  # not "*": an inline command
            words = line.split()[:_CAPTURE]
            if not words or _INLINE.fullmatch(words[0]) is None or not line.isascii():
                raise ProtocolError("not a command")
            self.captured = words
            self._done(values)
            return
        if self.requests and kind not in (0x2A, 0x24):
            raise ProtocolError("a request holds only arrays of bulk strings")
        if kind in _SCALARS:
            self._done(values)
            return
        count = _integer(line)
        if kind in _BLOBS:
            if count == -1 and kind == 0x24:
                self._done(values)
                return
            if not 0 <= count <= MAX_BULK:
                raise ProtocolError("bad bulk length")
            self.skip = count + 2
            if (
                self.requests
                and len(self.stack) == 1
                and len(self.captured) < _CAPTURE
                and count <= _CAPTURE_BYTES
            ):
                self.capturing = True
                self.captured.append(b"")
            return
        if kind in _PAIRS:
            count *= 2
        elif kind not in _AGGREGATES:
            raise ProtocolError(f"unknown type {chr(kind)!r}")
        if (count == -1 and kind == 0x2A) or count == 0:
            self._done(values)
            return
        if not 0 < count <= MAX_ELEMENTS or len(self.stack) >= MAX_DEPTH:
            raise ProtocolError("bad aggregate length")
        self.stack.append(count)

    def _done(self, values: list[tuple[int, list[bytes]]]) -> None:
        """One value complete: it counts towards its aggregate, or is a top-level value."""
        stack = self.stack
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                return
            stack.pop()
        values.append((self.kind, self.captured))


def command_name(raw: bytes) -> str:
    """A command as a stat name: lowercase, Redis's own characters only."""
    name = raw.decode("latin-1").lower()
    if len(name) > 32 or not name or not set(name) <= _NAME_CHARS:
        return "unknown"
    return name


class RedisSniffer:
    """Feed `request(data, now)` with the client's bytes and `response(data, now)` with the
    server's; `now` in seconds (any monotonic clock)."""

    def __init__(self, stats: ProtocolStats) -> None:
        self.stats = stats
        self.requests = RespReader(requests=True)
        self.replies = RespReader(requests=False)
        self.waiting: deque[tuple[str, float]] = deque()
        self.matching = True
        self.failed = False

    def request(self, data: bytes, now: float) -> None:
        if self.failed:
            return
        try:
            values = self.requests.feed(data)
        except ProtocolError:
            self._fail()
            return
        stats = self.stats
        for _, captured in values:
            if not captured:
                continue
            name = command_name(captured[0])
            stats.count("downstream_rq_total")
            stats.command(name).total += 1
            if not self.matching:
                continue
            if name in _UNMATCHED or (
                name == "client"
                and len(captured) > 2
                and captured[1].lower() == b"reply"
                and captured[2].lower() in (b"off", b"skip")
            ):
                self.matching = False
                self.waiting.clear()
                continue
            if len(self.waiting) >= MAX_WAITING:
                self.matching = False
                self.waiting.clear()
                continue
            self.waiting.append((name, now))

    def response(self, data: bytes, now: float) -> None:
        if self.failed:
            return
        try:
            values = self.replies.feed(data)
        except ProtocolError:
            self._fail()
            return
        stats = self.stats
        for kind, _ in values:
            if kind == 0x7C or kind == 0x3E:  # "|" attributes, ">" pushes: not replies
                continue
            error = kind in _ERRORS
            if error:
                stats.count("error_reply")
            if not self.matching:
                continue
            if not self.waiting:
                stats.count("unmatched_reply")
                continue
            name, started = self.waiting.popleft()
            stats.reply(name, started, now, error=error)

    def _fail(self) -> None:
        self.failed = True
        self.waiting.clear()
        self.requests.buffer.clear()
        self.replies.buffer.clear()
        self.stats.count("decoding_error")


def _integer(line: bytes) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise ProtocolError("bad length") from None
