"""Mixer's compressed attribute bags (istio.mixer.v1.CompressedAttributes), both ways.

Every string of a bag (attribute names, string values, map keys and values) travels as a
sint32 index: non-negative into GLOBAL_WORDS, the dictionary client and server share, and
negative into the message's own `words` (-1 is words[0]). The global dictionary only ever grows
at its end, so a client tells the size it used (`global_word_count`) and the server accepts
indexes below it. A Report's records are delta-encoded: each one changes the bag before it.

Values are the Python values of istio.expr's table: str, int, float, bool, bytes (IP
addresses), datetime, timedelta, and Mapping[str, str].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.internal.containers import MessageMap, ScalarMap
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from istio.api.mixer.v1 import attributes_pb2, check_pb2, report_pb2
from istio.expr import Value

# Istio's global dictionary (istio/api mixer/v1/global_dictionary.yaml, as mixer's
# pkg/attribute/list.gen.go lists it), in order; append-only.
GLOBAL_WORDS: tuple[str, ...] = (
    "source.ip",
    "source.port",
    "source.name",
    "source.uid",
    "source.namespace",
    "source.labels",
    "source.user",
    "target.ip",
    "target.port",
    "target.service",
    "target.name",
    "target.uid",
    "target.namespace",
    "target.labels",
    "target.user",
    "request.headers",
    "request.id",
    "request.path",
    "request.host",
    "request.method",
    "request.reason",
    "request.referer",
    "request.scheme",
    "request.size",
    "request.time",
    "request.useragent",
    "response.headers",
    "response.size",
    "response.time",
    "response.duration",
    "response.code",
    ":authority",
    ":method",
    ":path",
    ":scheme",
    ":status",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "access-control-request-method",
    "access-control-request-headers",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "keep-alive",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-sec",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
    "GET",
    "POST",
    "http",
    "envoy",
    "'200'",
    "Keep-Alive",
    "chunked",
    "x-envoy-service-time",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-http-method-override",
    "x-request-id",
    "x-requested-with",
    "application/json",
    "application/xml",
    "gzip",
    "text/html",
    "text/html; charset=utf-8",
    "text/plain",
    "text/plain; charset=utf-8",
    "'0'",
    "'1'",
    "true",
    "false",
    "gzip, deflate",
    "max-age=0",
    "x-envoy-upstream-service-time",
    "x-envoy-internal",
    "x-envoy-expected-rq-timeout-ms",
    "x-ot-span-context",
    "x-b3-traceid",
    "x-b3-sampled",
    "x-b3-spanid",
    "tcp",
    "connection.id",
    "connection.received.bytes",
    "connection.received.bytes_total",
    "connection.sent.bytes",
    "connection.sent.bytes_total",
    "connection.duration",
    "context.protocol",
    "context.timestamp",
    "context.time",
    "0",
    "1",
    "200",
    "302",
    "400",
    "401",
    "403",
    "404",
    "409",
    "429",
    "499",
    "500",
    "501",
    "502",
    "503",
    "504",
    "destination.ip",
    "destination.port",
    "destination.service",
    "destination.name",
    "destination.uid",
    "destination.namespace",
    "destination.labels",
    "destination.user",
    "source.service",
    "api.service",
    "api.version",
    "api.operation",
    "api.protocol",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.api_key",
    "check.error_code",
    "check.error_message",
    "request.total_size",
    "response.total_size",
    "connection.event",
    "check.cache_hit",
    "quota.cache_hit",
    "source.principal",
    "request.auth.claims",
    "request.auth.raw_claims",
    "connection.mtls",
    "source.metadata",
    "source.owner",
    "source.services",
    "source.workload.uid",
    "source.workload.name",
    "source.workload.namespace",
    "destination.metadata",
    "destination.owner",
    "destination.principal",
    "destination.workload.uid",
    "destination.workload.name",
    "destination.workload.namespace",
    "destination.service.uid",
    "destination.service.name",
    "destination.service.namespace",
    "destination.service.host",
    "destination.container.name",
    "destination.container.image",
    "context.reporter.local",
    "context.reporter.uid",
    "response.grpc_status",
    "response.grpc_message",
    "context.reporter.type",
    "context.reporter.kind",
)
GLOBAL_INDEX: Mapping[str, int] = {word: index for index, word in enumerate(GLOBAL_WORDS)}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DecodeError(ValueError):
    """A compressed bag refers to a word that is not there (or is otherwise malformed)."""


class _Words:
    __slots__ = ("_global_count", "_local")

    def __init__(self, local: Sequence[str], global_word_count: int) -> None:
        self._local = local
        # 0 means "not said": assume the whole dictionary, as a client of this version would.
        count = global_word_count or len(GLOBAL_WORDS)
        self._global_count = min(count, len(GLOBAL_WORDS))

    def __call__(self, index: int) -> str:
        if index >= 0:
            if index >= self._global_count:
                raise DecodeError(
                    f"word index {index} is past the global dictionary "
                    f"({self._global_count} words shared)"
                )
            return GLOBAL_WORDS[index]
        position = -1 - index
        if position >= len(self._local):
            raise DecodeError(
                f"word index {index} is past the message dictionary ({len(self._local)} words)"
            )
        return self._local[position]


def timestamp_value(message: object) -> datetime:
    seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def duration_value(message: object) -> timedelta:
    seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


def decode(
    message: attributes_pb2.CompressedAttributes,
    global_word_count: int = 0,
    *,
    default_words: Sequence[str] = (),
    into: dict[str, Value] | None = None,
) -> dict[str, Value]:
    """The bag `message` holds (added to `into`, which is returned, when given). A message
    without words of its own reads `default_words` (a Report's shared dictionary)."""
    local = message.words or default_words
    shared = _shared_words(global_word_count)
    bag: dict[str, Value] = {} if into is None else into
    # The hot path of every Check: indexes looked up inline (~i is -1 - i), map entries read
    # by key (faster than .items() on protobuf maps); a bad index surfaces as IndexError and
    # is explained by the slow path below.
    try:
        strings = message.strings
        for name in strings:
            value = strings[name]
            bag[shared[name] if name >= 0 else local[~name]] = (
                shared[value] if value >= 0 else local[~value]
            )
        for field in (message.int64s, message.doubles, message.bools, message.bytes):
            for name in field:
                bag[shared[name] if name >= 0 else local[~name]] = field[name]
        timestamps = message.timestamps
        for name in timestamps:
            bag[shared[name] if name >= 0 else local[~name]] = timestamp_value(timestamps[name])
        durations = message.durations
        for name in durations:
            bag[shared[name] if name >= 0 else local[~name]] = duration_value(durations[name])
        maps = message.string_maps
        for name in maps:
            entries = maps[name].entries
            bag[shared[name] if name >= 0 else local[~name]] = {
                (shared[k] if k >= 0 else local[~k]): (
                    shared[entries[k]] if entries[k] >= 0 else local[~entries[k]]
                )
                for k in entries
            }
    except IndexError:
        _explain(message, global_word_count, local)
        raise
    return bag


_SHARED: dict[int, tuple[str, ...]] = {}


def _shared_words(global_word_count: int) -> tuple[str, ...]:
    """The global words a client shares (0 means "not said": all of them)."""
    found = _SHARED.get(global_word_count)
    if found is None:
        count = global_word_count or len(GLOBAL_WORDS)
        found = _SHARED[global_word_count] = GLOBAL_WORDS[: min(count, len(GLOBAL_WORDS))]
    return found


def _explain(
    message: attributes_pb2.CompressedAttributes, global_word_count: int, local: Sequence[str]
) -> None:
    """Raise DecodeError naming the index of `message` that is out of range."""
    word = _Words(local, global_word_count)
    names: list[int] = [
        *message.strings,
        *message.strings.values(),
        *message.int64s,
        *message.doubles,
        *message.bools,
        *message.timestamps,
        *message.durations,
        *message.bytes,
    ]
    for name in names:
        word(name)
    for name in message.string_maps:
        word(name)
        entries = message.string_maps[name].entries
        for key in entries:
            word(key)
            word(entries[key])


def decode_report(
    request: report_pb2.ReportRequest,
    into: Callable[[Mapping[str, Value]], dict[str, Value]] = dict,
) -> list[dict[str, Value]]:
    """Every record of a Report, each a complete bag (the deltas applied in order); `into`
    makes each record's dict from the one before (a dict subclass, say)."""
    bags: list[dict[str, Value]] = []
    previous: dict[str, Value] = {}
    default_words = list(request.default_words)
    for position, record in enumerate(request.attributes):
        try:
            current = decode(
                record, request.global_word_count, default_words=default_words, into=into(previous)
            )
        except DecodeError as error:
            raise DecodeError(f"record {position}: {error}") from None
        bags.append(current)
        previous = current
    return bags


class WordTable:
    """Assigns indexes to strings while encoding: global words by their index, others into a
    message dictionary (`words`)."""

    __slots__ = ("_index", "words")

    def __init__(self) -> None:
        self.words: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, word: str) -> int:
        shared = GLOBAL_INDEX.get(word)
        if shared is not None:
            return shared
        index = self._index.get(word)
        if index is None:
            self.words.append(word)
            index = self._index[word] = -len(self.words)
        return index


def encode_into(
    bag: Mapping[str, Value], message: attributes_pb2.CompressedAttributes, word: WordTable
) -> None:
    """Add `bag`'s attributes to `message`, strings indexed through `word` (whose `words` the
    caller puts in the message or the Report's default_words)."""
    # Each of the message's maps is fetched once, when first needed: fetching one from the
    # protobuf runtime costs more than setting an entry (this runs for every Report record).
    strings: ScalarMap[int, int] | None = None
    int64s: ScalarMap[int, int] | None = None
    timestamps: MessageMap[int, Timestamp] | None = None
    durations: MessageMap[int, Duration] | None = None
    for name, value in bag.items():
        index = word(name)
        if isinstance(value, str):
            if strings is None:
                strings = message.strings
            strings[index] = word(value)
        elif isinstance(value, bool):
            message.bools[index] = value
        elif isinstance(value, int):
            if int64s is None:
                int64s = message.int64s
            int64s[index] = value
        elif isinstance(value, float):
            message.doubles[index] = value
        elif isinstance(value, bytes):
            message.bytes[index] = value
        elif isinstance(value, datetime):
            if timestamps is None:
                timestamps = message.timestamps
            delta = value - _EPOCH
            stamp = timestamps[index]
            stamp.seconds = delta.days * 86400 + delta.seconds
            stamp.nanos = delta.microseconds * 1000
        elif isinstance(value, timedelta):
            if durations is None:
                durations = message.durations
            duration = durations[index]
            micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
            duration.seconds, rest = divmod(micros, 1_000_000)
            if duration.seconds < 0 and rest:
                duration.seconds += 1
                rest -= 1_000_000
            duration.nanos = rest * 1000
        elif isinstance(value, Mapping):
            entries = message.string_maps[index].entries
            for key, item in value.items():
                entries[word(key)] = word(item)
        else:
            raise TypeError(f"attribute {name}: cannot send a {type(value).__name__}")


def encode(bag: Mapping[str, Value]) -> attributes_pb2.CompressedAttributes:
    """`bag` as one self-contained message (its own words)."""
    message = attributes_pb2.CompressedAttributes()
    word = WordTable()
    encode_into(bag, message, word)
    message.words.extend(word.words)
    return message


def changed(previous: Mapping[str, Value], current: Mapping[str, Value]) -> dict[str, Value] | None:
    """The delta from `previous` to `current` (attributes new or changed), or None when
    `current` lacks some attribute `previous` had (a delta cannot remove one)."""
    if not previous.keys() <= current.keys():
        return None
    before = previous.get
    # Most values of consecutive records are the very same objects (a listener's destination
    # attributes): `is` settles those without comparing maps or timestamps.
    return {
        name: value
        for name, value in current.items()
        if (old := before(name, _ABSENT)) is not value and old != value
    }


_ABSENT = object()


def referenced_words(
    referenced: check_pb2.ReferencedAttributes, global_word_count: int = 0
) -> list[tuple[str, int, str | None]]:
    """(name, condition, map key or None) for each match of a Check's referenced attributes.

    `map_key` is a plain sint32, so 0 (unset) and global word 0 look alike: a key is therefore
    always sent as a message word (a negative index), and 0 means "the whole attribute"."""
    word = _Words(referenced.words, global_word_count)
    found: list[tuple[str, int, str | None]] = []
    for match in referenced.attribute_matches:
        key = word(match.map_key) if match.map_key < 0 else None
        found.append((word(match.name), match.condition, key))
    return found


def encode_plain(bag: Mapping[str, Value]) -> attributes_pb2.Attributes:
    """`bag` in plain form (istio.mixer.v1.Attributes): what one sidecar tells another in the
    x-istio-attributes header, where no dictionary is shared."""
    message = attributes_pb2.Attributes()
    for name, value in bag.items():
        slot = message.attributes[name]
        if isinstance(value, str):
            slot.string_value = value
        elif isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, int):
            slot.int64_value = value
        elif isinstance(value, float):
            slot.double_value = value
        elif isinstance(value, bytes):
            slot.bytes_value = value
        elif isinstance(value, datetime):
            delta = value - _EPOCH
            slot.timestamp_value.seconds = delta.days * 86400 + delta.seconds
            slot.timestamp_value.nanos = delta.microseconds * 1000
        elif isinstance(value, timedelta):
            slot.duration_value.FromTimedelta(value)
        elif isinstance(value, Mapping):
            slot.string_map_value.SetInParent()  # an empty map is still a map
            slot.string_map_value.entries.update(value)
        else:
            raise TypeError(f"attribute {name}: cannot send a {type(value).__name__}")
    return message


def read_plain(data: bytes) -> dict[str, Value]:
    """The bag a serialized plain-form message holds; DecodeError when it is not one."""
    try:
        message = attributes_pb2.Attributes.FromString(data)
    except _ProtobufDecodeError as error:
        raise DecodeError(f"not an istio.mixer.v1.Attributes: {error}") from None
    return decode_plain(message)


def decode_plain(message: attributes_pb2.Attributes) -> dict[str, Value]:
    """The bag a plain-form message holds; attributes without a value are left out."""
    bag: dict[str, Value] = {}
    for name, slot in message.attributes.items():
        kind = slot.WhichOneof("value")
        if kind is None:
            continue
        if kind == "timestamp_value":
            bag[name] = timestamp_value(slot.timestamp_value)
        elif kind == "duration_value":
            bag[name] = duration_value(slot.duration_value)
        elif kind == "string_map_value":
            bag[name] = dict(slot.string_map_value.entries)
        else:
            bag[name] = getattr(slot, kind)
    return bag
