"""HPACK (RFC 7541): header compression for HTTP/2.

Headers are lists of `(name, value)` byte-string tuples. The decoder hands out the very tuples
its tables hold, so an indexed field (the common case once a connection is warm: one byte per
header) costs a list append. Literals are checked once, when decoded (names lowercase tokens,
values free of NUL/CR/LF and of surrounding whitespace, RFC 9113 §8.2.1); a dynamic-table entry
was checked when it was inserted, so indexed fields need no check. A bad field does not stop
decoding (the dynamic table must stay in step with the peer's): the decoder records the reason
in `invalid` for the connection to reset the stream.

Limits (each an error the connection turns into a GOAWAY): integers above 2**32, strings longer
than `max_string_length`, a decoded header list above `max_header_list_size` (the HPACK bomb:
a few bytes that index one large entry many times), table size updates above the size we
advertised or after the first field.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable

from istio.http2 import huffman

__all__ = [
    "STATIC_TABLE",
    "Decoder",
    "Encoder",
    "HPACKError",
    "HeaderListTooLarge",
    "Headers",
]

Header = tuple[bytes, bytes]
Headers = list[Header]

STATIC_TABLE: tuple[Header, ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_COUNT = len(STATIC_TABLE)  # 61
# Index 0 is invalid; 1..61 the static table.
_STATIC: tuple[Header, ...] = ((b"", b""), *STATIC_TABLE)
_STATIC_FIELD: dict[Header, int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, _field in enumerate(STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault(_field, _index)
    _STATIC_NAME.setdefault(_field[0], _index)
_STATIC_SIZE = tuple(len(name) + len(value) + 32 for name, value in _STATIC)

ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
DEFAULT_TABLE_SIZE = 4096
_MAX_INT = 1 << 32

# RFC 9113 §8.2.1: names are lowercase tokens (a pseudo-header adds a leading colon); values
# carry no NUL, CR or LF and no leading or trailing space or tab.
_NAME = re.compile(rb"\A:?[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


class HPACKError(Exception):
    """The header block cannot be decoded: a COMPRESSION_ERROR for the connection."""


class HeaderListTooLarge(HPACKError):
    """The decoded list exceeds the limit: ENHANCE_YOUR_CALM for the connection."""


def _check(name: bytes, value: bytes) -> str | None:
    if _NAME.match(name) is None:
        return f"invalid header name {name[:64]!r}"
    if _BAD_VALUE.search(value) is not None:
        return f"invalid value for header {name[:64]!r}"
    return None


class Decoder:
    __slots__ = (
        "_size",
        "_sizes",
        "_table",
        "invalid",
        "max_allowed_table_size",
        "max_header_list_size",
        "max_string_length",
        "max_table_size",
        "validate",
    )

    def __init__(
        self,
        max_table_size: int = DEFAULT_TABLE_SIZE,
        *,
        max_header_list_size: int = 65536,
        max_string_length: int = 65536,
        validate: bool = True,
    ) -> None:
        # The size the peer may use (our SETTINGS_HEADER_TABLE_SIZE) and the size in force
        # (4096 until the peer's encoder sends an update, RFC 7541 §4.2).
        self.max_allowed_table_size = max_table_size
        self.max_table_size = DEFAULT_TABLE_SIZE
        self.max_header_list_size = max_header_list_size
        self.max_string_length = max_string_length
        self.validate = validate
        self.invalid: str | None = None
        self._table: deque[Header] = deque()
        self._sizes: deque[int] = deque()  # entry sizes, in step with _table
        self._size = 0

    @property
    def table(self) -> list[Header]:
        """The dynamic table, newest first (index 62 is element 0)."""
        return list(self._table)

    def _field(self, index: int) -> Header:
        if index <= _STATIC_COUNT:
            if index == 0:
                raise HPACKError("index 0 is not a header field")
            return _STATIC[index]
        try:
            return self._table[index - _STATIC_COUNT - 1]
        except IndexError:
            raise HPACKError(f"header index {index} is beyond the tables") from None

    def _add(self, field: Header) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        table = self._table
        limit = self.max_table_size
        sizes = self._sizes
        if size > limit:  # RFC 7541 §4.4: empties the table, inserts nothing
            table.clear()
            sizes.clear()
            self._size = 0
            return
        self._size += size
        while self._size > limit:
            table.pop()
            self._size -= sizes.pop()
        table.appendleft(field)
        sizes.appendleft(size)

    def _resize(self, size: int) -> None:
        if size > self.max_allowed_table_size:
            raise HPACKError(
                f"table size update to {size} exceeds the {self.max_allowed_table_size} allowed"
            )
        self.max_table_size = size
        while self._size > size:
            self._table.pop()
            self._size -= self._sizes.pop()

    def decode(self, data: bytes) -> Headers:
        """The header list of one complete header block. Raises HPACKError."""
        self.invalid = None
        headers: Headers = []
        append = headers.append
        table = self._table
        sizes = self._sizes
        total = 0
        limit = self.max_header_list_size
        position = 0
        end = len(data)
        fields = False
        try:
            while position < end:
                byte = data[position]
                position += 1
                if byte & 0x80:  # indexed field, §6.1: the hot path
                    index = byte & 0x7F
                    if index == 0x7F:
                        index, position = _integer(data, position, index)
                    if index <= _STATIC_COUNT:
                        if not index:
                            raise HPACKError("index 0 is not a header field")
                        field = _STATIC[index]
                        total += _STATIC_SIZE[index]
                    else:
                        try:
                            field = table[index - _STATIC_COUNT - 1]
                        except IndexError:
                            raise HPACKError(f"header index {index} is beyond the tables") from None
                        total += sizes[index - _STATIC_COUNT - 1]
                    fields = True
                else:
                    if byte & 0x40:  # literal with incremental indexing, §6.2.1
                        index = byte & 0x3F
                        if index == 0x3F:
                            index, position = _integer(data, position, index)
                    elif byte & 0x20:  # dynamic table size update, §6.3
                        if fields:
                            raise HPACKError("table size update after the first header field")
                        index = byte & 0x1F
                        if index == 0x1F:
                            index, position = _integer(data, position, index)
                        self._resize(index)
                        continue
                    else:  # literal without indexing / never indexed, §6.2.2-3
                        index = byte & 0x0F
                        if index == 0x0F:
                            index, position = _integer(data, position, index)
                    if index:
                        name = self._field(index)[0]
                    else:
                        name, position = self._string(data, position)
                    value, position = self._string(data, position)
                    field = (name, value)
                    if self.validate and self.invalid is None:
                        self.invalid = _check(name, value)
                    if byte & 0x40:
                        self._add(field)
                    fields = True
                    total += len(name) + len(value) + ENTRY_OVERHEAD
                if total > limit:
                    raise HeaderListTooLarge(
                        f"decoded header list exceeds {limit} bytes (RFC 7541 §4.1 sizes)"
                    )
                append(field)
        except IndexError:
            raise HPACKError("header block ends inside a field") from None
        return headers

    def _string(self, data: bytes, position: int) -> tuple[bytes, int]:
        byte = data[position]
        length = byte & 0x7F
        position += 1
        if length == 0x7F:
            length, position = _integer(data, position, length)
        if length > self.max_string_length:
            raise HeaderListTooLarge(
                f"header string of {length} bytes exceeds {self.max_string_length}"
            )
        stop = position + length
        if stop > len(data):
            raise HPACKError("header block ends inside a string")
        text = data[position:stop]
        if byte & 0x80:
            decoded = _huffman_cache.get(text)
            if decoded is None:
                try:
                    decoded = huffman.decode(text)
                except huffman.HuffmanError as error:
                    raise HPACKError(str(error)) from None
                if length <= _CACHED_LENGTH:
                    if len(_huffman_cache) >= _CACHE_ENTRIES:
                        _huffman_cache.clear()
                    _huffman_cache[text] = decoded
            return decoded, stop
        return text, stop


# Decoded Huffman strings shared by every connection: values that fall out of (or never enter)
# a dynamic table, such as deadlines, paths and user agents, recur across requests and
# connections, and a dict lookup costs far less than decoding again.
_huffman_cache: dict[bytes, bytes] = {}
_CACHE_ENTRIES = 1024
_CACHED_LENGTH = 64


def _integer(data: bytes, position: int, value: int) -> tuple[int, int]:
    """The continuation bytes of an integer whose prefix was all ones (§5.1)."""
    shift = 0
    while True:
        byte = data[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= _MAX_INT:
                raise HPACKError("integer exceeds 2**32")
            return value, position
        shift += 7
        if shift > 28:
            raise HPACKError("integer exceeds 2**32")


def _encode_integer(out: bytearray, flags: int, prefix_bits: int, value: int) -> None:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(flags | value)
        return
    out.append(flags | limit)
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


# Values that change with every request: indexing them only evicts useful entries.
DEFAULT_NO_INDEX = frozenset(
    {
        b"content-length",
        b"date",
        b"etag",
        b"age",
        b"if-modified-since",
        b"if-none-match",
        b"location",
        b"set-cookie",
        b"x-request-id",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-ot-span-context",
        b"grpc-timeout",
    }
)
# Never indexed (RFC 7541 §7.1.3): secrets an intermediary must not put in a table either.
DEFAULT_NEVER_INDEX = frozenset({b"authorization", b"proxy-authorization"})


class Encoder:
    """Encodes header lists; `huffman` codes strings whose Huffman form is shorter."""

    __slots__ = (
        "_entries",
        "_fields",
        "_inserted",
        "_names",
        "_pending_sizes",
        "_size",
        "huffman",
        "max_table_size",
        "never_index",
        "no_index",
    )

    def __init__(
        self,
        *,
        huffman: bool = True,
        no_index: Iterable[bytes] = DEFAULT_NO_INDEX,
        never_index: Iterable[bytes] = DEFAULT_NEVER_INDEX,
    ) -> None:
        self.huffman = huffman
        self.no_index = frozenset(no_index)
        self.never_index = frozenset(never_index)
        self.max_table_size = DEFAULT_TABLE_SIZE
        # Entries oldest first with their insertion number; field/name -> newest number.
        self._entries: deque[tuple[Header, int]] = deque()
        self._fields: dict[Header, int] = {}
        self._names: dict[bytes, int] = {}
        self._inserted = 0
        self._size = 0
        self._pending_sizes: list[int] = []

    def set_max_table_size(self, size: int) -> None:
        """Follow the peer's SETTINGS_HEADER_TABLE_SIZE (we use at most 4096)."""
        size = min(size, DEFAULT_TABLE_SIZE)
        if size == self.max_table_size and not self._pending_sizes:
            return
        self._pending_sizes.append(size)
        self.max_table_size = size
        self._evict()

    def _evict(self) -> None:
        while self._size > self.max_table_size:
            field, number = self._entries.popleft()
            self._size -= len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if self._fields.get(field) == number:
                del self._fields[field]
            if self._names.get(field[0]) == number:
                del self._names[field[0]]

    def encode(self, headers: Iterable[Header]) -> bytes:
        out = bytearray()
        if self._pending_sizes:
            # The smallest size since the last block first, then the current (§4.2).
            smallest = min(self._pending_sizes)
            if smallest != self.max_table_size:
                _encode_integer(out, 0x20, 5, smallest)
            _encode_integer(out, 0x20, 5, self.max_table_size)
            self._pending_sizes.clear()
        static = _STATIC_FIELD
        fields = self._fields
        for field in headers:
            index = static.get(field)
            if index is not None:
                out.append(0x80 | index)
                continue
            number = fields.get(field)
            if number is not None:
                index = _STATIC_COUNT + 1 + self._inserted - number
                if index < 0x7F:
                    out.append(0x80 | index)
                else:
                    _encode_integer(out, 0x80, 7, index)
                continue
            self._literal(out, field)
        return bytes(out)

    def _literal(self, out: bytearray, field: Header) -> None:
        name, value = field
        name_index = _STATIC_NAME.get(name)
        if name_index is None:
            number = self._names.get(name)
            if number is not None:
                name_index = _STATIC_COUNT + 1 + self._inserted - number
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if name in self.never_index:
            flags, prefix = 0x10, 4
        elif name in self.no_index or size > self.max_table_size * 3 // 4:
            flags, prefix = 0x00, 4
        else:
            flags, prefix = 0x40, 6
        if name_index is None:
            out.append(flags)
            self._string(out, name)
        else:
            _encode_integer(out, flags, prefix, name_index)
        self._string(out, value)
        if flags == 0x40:
            self._inserted += 1
            number = self._inserted
            self._entries.append((field, number))
            self._fields[field] = number
            self._names[name] = number
            self._size += size
            self._evict()

    def _string(self, out: bytearray, text: bytes) -> None:
        if self.huffman and len(text) > 1:
            coded = huffman.encode(text)
            if len(coded) < len(text):
                _encode_integer(out, 0x80, 7, len(coded))
                out += coded
                return
        _encode_integer(out, 0x00, 7, len(text))
        out += text
