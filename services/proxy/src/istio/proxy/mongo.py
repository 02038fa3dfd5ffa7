"""MongoDB wire protocol stats, sans-io: the bytes of both directions of a connection are fed
in as they pass; the parser never changes or holds them back, it only counts.

Every message starts with a 16-byte header (length, requestID, responseTo, opCode). Requests
are counted by opcode (`op_msg`, `op_query`, `op_insert`, ...) and, when they name one, by
command: the first key of an OP_MSG body or of an OP_QUERY on `<db>.$cmd` (`find`, `insert`,
`update`, `delete`, `aggregate`, `hello`, ...). A reply (OP_REPLY, or OP_MSG from the server)
is matched to its request by responseTo, which gives the command its latency and its outcome:
`ok: 0` in the reply document, or OP_REPLY's QueryFailure flag, is an error.

Messages up to `MAX_DECODE` bytes are decoded whole; of larger ones only the first `HEAD`
bytes are kept (the command name is at the start; an `ok` beyond the head is not seen, so
such a reply counts as a success) and the rest is skipped as it streams past. Anything that
is not the wire protocol (a bad length, an unknown opcode, broken BSON) stops the parser for
good (`decoding_error`); the connection carries on untouched. OP_COMPRESSED messages are
counted, not decompressed.
"""

from __future__ import annotations

import re
import struct

from istio.proxy.stats import ProtocolStats

MAX_MESSAGE = 48 * 1024 * 1024  # maxMessageSizeBytes
MAX_DECODE = 1024 * 1024
HEAD = 16 * 1024
MAX_WAITING = 10_000  # requests waiting for replies; beyond, new ones are not timed

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMPRESSED = 2012
OP_MSG = 2013
_OP_NAMES = {
    OP_REPLY: "op_reply",
    OP_UPDATE: "op_update",
    OP_INSERT: "op_insert",
    OP_QUERY: "op_query",
    OP_GET_MORE: "op_get_more",
    OP_DELETE: "op_delete",
    OP_KILL_CURSORS: "op_kill_cursors",
    OP_COMPRESSED: "op_compressed",
    OP_MSG: "op_msg",
}
_HEADER = struct.Struct("<iiii")
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_DOUBLE = struct.Struct("<d")
_QUERY_FAILURE = 2
_CHECKSUM_PRESENT = 1
_MORE_TO_COME = 2
_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.-]{0,47}")

# Fixed sizes of BSON values by type; the others are sized by their contents (_skip).
_FIXED = {
    0x01: 8,
    0x06: 0,
    0x07: 12,
    0x08: 1,
    0x09: 8,
    0x0A: 0,
    0x10: 4,
    0x11: 8,
    0x12: 8,
    0x13: 16,
    0x7F: 0,
    0xFF: 0,
}


class ProtocolError(ValueError):
    pass


class Message:
    __slots__ = ("body", "op_code", "request_id", "response_to", "whole")

    def __init__(
        self, op_code: int, request_id: int, response_to: int, body: bytes, whole: bool
    ) -> None:
        self.op_code = op_code
        self.request_id = request_id
        self.response_to = response_to
        self.body = body  # after the header; only the first HEAD bytes when not `whole`
        self.whole = whole


class MessageReader:
    """Splits a byte stream into wire protocol messages."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0  # bytes of a large message still to pass over

    def feed(self, data: bytes) -> list[Message]:
        messages: list[Message] = []
        if self.skip:
            if len(data) <= self.skip:
                self.skip -= len(data)
                return messages
            data = data[self.skip :]
            self.skip = 0
        buffer = self.buffer
        buffer += data
        position = 0
        available = len(buffer)
        while available - position >= 16:
            length, request_id, response_to, op_code = _HEADER.unpack_from(buffer, position)
            if not 16 <= length <= MAX_MESSAGE:
                raise ProtocolError(f"message length {length}")
            if op_code not in _OP_NAMES:
                raise ProtocolError(f"opcode {op_code}")
            if length <= MAX_DECODE:
                if available - position < length:
                    break
                body = bytes(buffer[position + 16 : position + length])
                messages.append(Message(op_code, request_id, response_to, body, True))
                position += length
                continue
            if available - position < 16 + HEAD:
                break
            body = bytes(buffer[position + 16 : position + 16 + HEAD])
            messages.append(Message(op_code, request_id, response_to, body, False))
            taken = min(length, available - position)
            position += taken
            self.skip = length - taken
            if self.skip:
                break
        del buffer[:position]
        return messages


class MongoSniffer:
    """Feed `request(data, now)` with the client's bytes and `response(data, now)` with the
    server's; `now` in seconds (any monotonic clock). `commands`, when not empty, limits the
    per-command stats to those commands (mongo_proxy's `commands`)."""

    def __init__(self, stats: ProtocolStats, commands: frozenset[str] = frozenset()) -> None:
        self.stats = stats
        self.commands = commands
        self.requests = MessageReader()
        self.replies = MessageReader()
        self.waiting: dict[int, tuple[str, float]] = {}
        self.failed = False

    def request(self, data: bytes, now: float) -> None:
        if self.failed:
            return
        try:
            for message in self.requests.feed(data):
                self._request(message, now)
        except ProtocolError:
            self._fail()

    def response(self, data: bytes, now: float) -> None:
        if self.failed:
            return
        try:
            for message in self.replies.feed(data):
                self._reply(message, now)
        except ProtocolError:
            self._fail()

    def _request(self, message: Message, now: float) -> None:
        op_code = message.op_code
        stats = self.stats
        stats.count(_OP_NAMES[op_code])
        name: str | None = None
        expects_reply = True
        if op_code == OP_MSG:
            flags, document = _msg_body(message)
            expects_reply = not flags & _MORE_TO_COME
            name = _first_key(message.body, document) if document is not None else None
        elif op_code == OP_QUERY:
            name = _query_command(message.body)
        elif op_code == OP_GET_MORE:
            name = "getMore"
        elif op_code == OP_COMPRESSED:
            name = "compressed"
        else:
            expects_reply = False
        if name is None:
            return
        name = _stat_name(name)
        if self.commands and name not in self.commands:
            return
        stats.command(name).total += 1
        if expects_reply and len(self.waiting) < MAX_WAITING:
            self.waiting[message.request_id] = (name, now)

    def _reply(self, message: Message, now: float) -> None:
        op_code = message.op_code
        stats = self.stats
        error = False
        if op_code == OP_REPLY:
            stats.count("op_reply")
            error = _reply_failed(message)
            if error:
                stats.count("op_reply_query_failure")
        elif op_code == OP_MSG:
            stats.count("op_msg_reply")
            _, document = _msg_body(message)
            error = document is not None and _not_ok(message.body, document)
        elif op_code == OP_COMPRESSED:
            stats.count("op_compressed_reply")
        else:
            stats.count(_OP_NAMES[op_code])
            return
        if error:
            stats.count("reply_error")
        waiting = self.waiting.pop(message.response_to, None)
        if waiting is None:
            return
        name, started = waiting
        stats.reply(name, started, now, error=error)

    def _fail(self) -> None:
        self.failed = True
        self.waiting.clear()
        self.requests.buffer.clear()
        self.replies.buffer.clear()
        self.stats.count("decoding_error")


def _stat_name(name: str) -> str:
    return name if _NAME.fullmatch(name) else "unknown"


def _msg_body(message: Message) -> tuple[int, int | None]:
    """OP_MSG's flags and the offset of its body (kind 0) section's document, if seen."""
    body = message.body
    if len(body) < 5:
        raise ProtocolError("short OP_MSG")
    flags = _INT32.unpack_from(body, 0)[0] & 0xFFFFFFFF
    if flags & 0xFFFF & ~(_CHECKSUM_PRESENT | _MORE_TO_COME):
        raise ProtocolError("unknown required OP_MSG flag")
    end = len(body) - (4 if flags & _CHECKSUM_PRESENT and message.whole else 0)
    position = 4
    while position < end:
        kind = body[position]
        position += 1
        if kind == 0:
            return flags, position
        if kind != 1 or position + 4 > len(body):
            raise ProtocolError(f"OP_MSG section kind {kind}")
        size = _INT32.unpack_from(body, position)[0]
        if size < 5:
            raise ProtocolError("OP_MSG section size")
        position += size
    if message.whole:
        raise ProtocolError("OP_MSG without a body section")
    return flags, None


def _query_command(body: bytes) -> str | None:
    """The command of an OP_QUERY on `<db>.$cmd`; "query" for other queries."""
    end = body.find(b"\x00", 4)
    if end < 0:
        raise ProtocolError("OP_QUERY collection")
    collection = body[4:end]
    document = end + 1 + 8
    if not collection.endswith(b".$cmd"):
        _first_key(body, document)  # the query must still be a document
        return "query"
    name = _first_key(body, document)
    if name in ("$query", "query"):
        inner = _field(body, document, name.encode())
        if inner is not None and inner[0] == 0x03:
            return _first_key(body, inner[1])
    return name


def _reply_failed(message: Message) -> bool:
    body = message.body
    if len(body) < 20:
        raise ProtocolError("short OP_REPLY")
    flags, returned = _INT32.unpack_from(body, 0)[0], _INT32.unpack_from(body, 16)[0]
    if flags & _QUERY_FAILURE:
        return True
    return returned > 0 and len(body) > 24 and _not_ok(body, 20)


def _not_ok(body: bytes, document: int) -> bool:
    found = _field(body, document, b"ok")
    if found is None:
        return False
    kind, position = found
    if kind == 0x01:
        return bool(_DOUBLE.unpack_from(body, position)[0] == 0.0)
    if kind == 0x10:
        return bool(_INT32.unpack_from(body, position)[0] == 0)
    if kind == 0x12:
        return bool(_INT64.unpack_from(body, position)[0] == 0)
    if kind == 0x08:
        return body[position] == 0
    return False


def _first_key(body: bytes, document: int) -> str | None:
    if document + 5 > len(body):
        return None  # beyond the head of a large message
    length = _INT32.unpack_from(body, document)[0]
    if length < 5:
        raise ProtocolError("BSON document length")
    kind = body[document + 4]
    if kind == 0:
        return None
    end = body.find(b"\x00", document + 5)
    if end < 0:
        return None
    return body[document + 5 : end].decode("utf-8", "replace")


def _field(body: bytes, document: int, name: bytes) -> tuple[int, int] | None:
    """(type, offset of the value) of a top-level field of the document at `document`; None
    when absent or beyond what the body holds."""
    if document + 5 > len(body):
        return None
    length = _INT32.unpack_from(body, document)[0]
    if length < 5:
        raise ProtocolError("BSON document length")
    end = min(document + length - 1, len(body))
    position = document + 4
    while position < end:
        kind = body[position]
        if kind == 0:
            return None
        key_end = body.find(b"\x00", position + 1, end)
        if key_end < 0:
            return None
        value = key_end + 1
        if body[position + 1 : key_end] == name:
            return kind, value
        position = _skip(body, kind, value)
    return None


def _skip(body: bytes, kind: int, position: int) -> int:
    """The offset after a BSON value of `kind` at `position`."""
    size = _FIXED.get(kind)
    if size is not None:
        return position + size
    if position + 4 > len(body):
        return len(body)
    if kind in (0x02, 0x0D, 0x0E):  # string, JavaScript, symbol: int32 length + bytes
        size = _INT32.unpack_from(body, position)[0] + 4
    elif kind in (0x03, 0x04, 0x0F):  # document, array, code with scope: length inclusive
        size = _INT32.unpack_from(body, position)[0]
    elif kind == 0x05:  # binary: int32 length + subtype + bytes
        size = _INT32.unpack_from(body, position)[0] + 5
    elif kind == 0x0C:  # DBPointer: string + ObjectId
        size = _INT32.unpack_from(body, position)[0] + 4 + 12
    elif kind == 0x0B:  # regex: two cstrings
        first = body.find(b"\x00", position)
        second = body.find(b"\x00", first + 1) if first >= 0 else -1
        return len(body) if second < 0 else second + 1
    else:
        raise ProtocolError(f"BSON type {kind}")
    if size < 4:
        raise ProtocolError("BSON value length")
    return position + int(size)
