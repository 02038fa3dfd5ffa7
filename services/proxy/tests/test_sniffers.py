"""The MongoDB and Redis sniffers (sans-io) over byte streams built by hand and by pymongo's
BSON: counts by operation and command, errors, latency matching, any split of the stream, and
garbage that stops them without an exception."""

from __future__ import annotations

import os
import struct

import bson
from hypothesis import given, settings
from hypothesis import strategies as st

from istio.proxy.mongo import MAX_DECODE, OP_MSG, OP_QUERY, OP_REPLY, MongoSniffer
from istio.proxy.redis import RedisSniffer
from istio.proxy.stats import MAX_COMMANDS, ProtocolStats


def resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


PIPELINE = resp(b"SET", b"k", b"v") + resp(b"GET", b"k") + b"PING\r\n" + resp(b"BOGUS", b"x")
REPLIES = b"+OK\r\n$1\r\nv\r\n+PONG\r\n-ERR unknown command 'BOGUS'\r\n"


def feed_redis(requests: bytes, replies: bytes, step: int = 0) -> ProtocolStats:
    stats = ProtocolStats()
    sniffer = RedisSniffer(stats)
    for data, feed in ((requests, sniffer.request), (replies, sniffer.response)):
        pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
        for piece in pieces:
            feed(piece, 1.0 if feed == sniffer.request else 1.005)
    return stats


def summary(stats: ProtocolStats) -> dict[str, tuple[int, int, int]]:
    return {n: (c.total, c.success, c.error) for n, c in stats.commands.items()}


def test_redis_pipeline_matched_in_order() -> None:
    stats = feed_redis(PIPELINE, REPLIES)
    assert summary(stats) == {
        "set": (1, 1, 0),
        "get": (1, 1, 0),
        "ping": (1, 1, 0),
        "bogus": (1, 0, 1),
    }
    assert stats.counters == {"downstream_rq_total": 4, "error_reply": 1}
    assert sum(stats.commands["get"].time.counts) == 1
    assert 4.9 < stats.commands["get"].time.sum < 5.1  # milliseconds


def test_redis_any_split_gives_the_same_stats() -> None:
    whole = summary(feed_redis(PIPELINE, REPLIES))
    for step in (1, 2, 3, 7):
        assert summary(feed_redis(PIPELINE, REPLIES, step)) == whole


def test_redis_nested_resp3_and_null_replies() -> None:
    requests = resp(b"HGETALL", b"h") + resp(b"GET", b"missing") + resp(b"LRANGE", b"l")
    replies = (
        b"%2\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n*2\r\n_\r\n#t\r\n"  # a map with a nested array
        b"$-1\r\n"
        b"|1\r\n+ttl\r\n:3\r\n*-1\r\n"  # an attribute, then the reply it annotates
    )
    stats = feed_redis(requests, replies)
    assert summary(stats) == {"hgetall": (1, 1, 0), "get": (1, 1, 0), "lrange": (1, 1, 0)}
    assert "decoding_error" not in stats.counters


def test_redis_large_values_stream_past_unbuffered() -> None:
    stats = ProtocolStats()
    sniffer = RedisSniffer(stats)
    value = os.urandom(4 * 1024 * 1024)
    request = resp(b"SET", b"big", value)
    for start in range(0, len(request), 65536):
        sniffer.request(request[start : start + 65536], 0.0)
        assert len(sniffer.requests.buffer) < 70_000
    sniffer.response(b"+OK\r\n", 0.0)
    assert summary(stats) == {"set": (1, 1, 0)}


def test_redis_subscribe_stops_matching() -> None:
    requests = resp(b"SUBSCRIBE", b"a", b"b") + resp(b"PING")
    replies = resp(b"subscribe", b"a", b":1") + resp(b"subscribe", b"b", b":2") + b"+PONG\r\n"
    stats = feed_redis(requests, replies)
    assert {n: c.total for n, c in stats.commands.items()} == {"subscribe": 1, "ping": 1}
    assert all(sum(c.time.counts) == 0 for c in stats.commands.values())


def test_redis_garbage_stops_the_parser() -> None:
    stats = feed_redis(b"\x00\x01\x02garbage\r\n" + PIPELINE, REPLIES)
    assert stats.counters["decoding_error"] == 1
    assert stats.commands == {}
    stats = feed_redis(PIPELINE, b"?what\r\n")
    assert stats.counters["decoding_error"] == 1


def test_redis_command_names_are_bounded() -> None:
    stats = feed_redis(b"".join(resp(b"CMD%d" % i) for i in range(3 * MAX_COMMANDS)), b"")
    assert len(stats.commands) == MAX_COMMANDS + 1
    assert stats.commands["other"].total == 2 * MAX_COMMANDS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.binary(max_size=512), st.integers(1, 64))
def test_redis_never_raises(requests: bytes, replies: bytes, step: int) -> None:
    feed_redis(requests, replies, step)


# MongoDB


def message(op_code: int, request_id: int, response_to: int, body: bytes) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, op_code) + body


def op_msg(request_id: int, document: dict[str, object], response_to: int = 0, **kw: int) -> bytes:
    flags = kw.get("flags", 0)
    sections = b"\x00" + bson.encode(document)
    if "documents" in kw:
        docs = b"".join(bson.encode({"i": i}) for i in range(kw["documents"]))
        sections += b"\x01" + struct.pack("<i", 4 + 10 + len(docs)) + b"documents\x00" + docs
    return message(OP_MSG, request_id, response_to, struct.pack("<I", flags) + sections)


def op_query(request_id: int, collection: bytes, document: dict[str, object]) -> bytes:
    body = struct.pack("<i", 0) + collection + b"\x00" + struct.pack("<ii", 0, -1)
    return message(OP_QUERY, request_id, 0, body + bson.encode(document))


def op_reply(response_to: int, document: dict[str, object], flags: int = 0) -> bytes:
    body = struct.pack("<iqii", flags, 0, 0, 1) + bson.encode(document)
    return message(OP_REPLY, 99, response_to, body)


MONGO_REQUESTS = (
    op_query(1, b"admin.$cmd", {"isMaster": 1, "helloOk": True})
    + op_msg(2, {"insert": "c", "$db": "d"}, documents=3)
    + op_msg(3, {"find": "c", "filter": {}, "$db": "d"})
    + op_msg(4, {"bogus": 1, "$db": "d"})
    + op_query(5, b"d.c", {"$query": {"x": 1}})
)
MONGO_REPLIES = (
    op_reply(1, {"ismaster": True, "maxWireVersion": 21, "ok": 1.0})
    + op_msg(10, {"n": 3, "ok": 1.0}, response_to=2)
    + op_msg(11, {"cursor": {"id": 0, "firstBatch": [{"a": "b" * 10}]}, "ok": 1}, response_to=3)
    + op_msg(12, {"ok": 0.0, "errmsg": "no such command", "code": 59}, response_to=4)
    + op_reply(5, {"$err": "bad"}, flags=2)
)


def feed_mongo(requests: bytes, replies: bytes, step: int = 0) -> ProtocolStats:
    stats = ProtocolStats()
    sniffer = MongoSniffer(stats)
    for data, feed in ((requests, sniffer.request), (replies, sniffer.response)):
        pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
        for piece in pieces:
            feed(piece, 2.0 if feed == sniffer.request else 2.01)
    return stats


def test_mongo_ops_commands_errors_and_latency() -> None:
    stats = feed_mongo(MONGO_REQUESTS, MONGO_REPLIES)
    assert stats.counters == {
        "op_query": 2,
        "op_msg": 3,
        "op_reply": 2,
        "op_msg_reply": 3,
        "op_reply_query_failure": 1,
        "reply_error": 2,
    }
    assert summary(stats) == {
        "isMaster": (1, 1, 0),
        "insert": (1, 1, 0),
        "find": (1, 1, 0),
        "bogus": (1, 0, 1),
        "query": (1, 0, 1),
    }
    assert 9.9 < stats.commands["find"].time.sum < 10.1


def test_mongo_any_split_gives_the_same_stats() -> None:
    whole = feed_mongo(MONGO_REQUESTS, MONGO_REPLIES)
    for step in (1, 5, 16, 33):
        split = feed_mongo(MONGO_REQUESTS, MONGO_REPLIES, step)
        assert split.counters == whole.counters
        assert summary(split) == summary(whole)


def test_mongo_large_messages_keep_their_head_only() -> None:
    big = op_msg(7, {"insert": "c", "$db": "d", "pad": "x" * (2 * MAX_DECODE)})
    stats = ProtocolStats()
    sniffer = MongoSniffer(stats)
    for start in range(0, len(big), 65536):
        sniffer.request(big[start : start + 65536], 0.0)
        assert len(sniffer.requests.buffer) < 100_000
    sniffer.response(op_msg(8, {"ok": 1}, response_to=7), 0.0)
    assert summary(stats) == {"insert": (1, 1, 0)}


def test_mongo_more_to_come_expects_no_reply() -> None:
    stats = feed_mongo(op_msg(1, {"insert": "c", "$db": "d"}, flags=2), b"")
    assert summary(stats) == {"insert": (1, 0, 0)}
    assert stats.counters == {"op_msg": 1}


def test_mongo_garbage_stops_the_parser() -> None:
    stats = feed_mongo(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + MONGO_REQUESTS, MONGO_REPLIES)
    assert stats.counters == {"decoding_error": 1}
    stats = feed_mongo(message(9999, 1, 0, b"x" * 10), b"")
    assert stats.counters == {"decoding_error": 1}
    broken = op_msg(1, {"find": "c"})[:-3] + b"\xee\xee\xee"  # a section of unknown kind follows
    stats = feed_mongo(message(OP_MSG, 1, 0, b"\x00\x00\x00\x00\x07junk"), b"")
    assert stats.counters["decoding_error"] == 1
    feed_mongo(broken, b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.binary(max_size=512), st.integers(1, 64))
def test_mongo_never_raises(requests: bytes, replies: bytes, step: int) -> None:
    feed_mongo(requests, replies, step)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(MONGO_REQUESTS) - 1), st.binary(min_size=1, max_size=8))
def test_mongo_mutated_streams_never_raise(position: int, junk: bytes) -> None:
    mutated = MONGO_REQUESTS[:position] + junk + MONGO_REQUESTS[position + len(junk) :]
    feed_mongo(mutated, MONGO_REPLIES, 7)
