"""The wire codec: any bag survives encode/decode, words go to the global dictionary when
they can, Report deltas, and malformed messages are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio.api.mixer.v1 import attributes_pb2, report_pb2
from istio.mixerclient.attributes import (
    GLOBAL_INDEX,
    GLOBAL_WORDS,
    DecodeError,
    WordTable,
    changed,
    decode,
    decode_plain,
    decode_report,
    encode,
    encode_into,
    encode_plain,
    read_plain,
)

_WORDS = st.one_of(st.sampled_from(GLOBAL_WORDS[:40]), st.text(max_size=8))
_VALUES = st.one_of(
    _WORDS,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.binary(max_size=16),
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.timedeltas(min_value=timedelta(days=-1000), max_value=timedelta(days=1000)),
    st.dictionaries(_WORDS, _WORDS, max_size=4),
)
_BAGS = st.dictionaries(_WORDS, _VALUES, max_size=10)


@given(_BAGS)
@settings(max_examples=300)
def test_encode_then_decode_gives_the_bag(bag: dict[str, object]) -> None:
    message = encode(bag)  # type: ignore[arg-type]
    wire = attributes_pb2.CompressedAttributes.FromString(message.SerializeToString())
    assert decode(wire, len(GLOBAL_WORDS)) == bag


def test_global_words_are_indexes_and_others_message_words() -> None:
    message = encode({"request.path": "/ratings", "request.method": "GET"})
    assert list(message.words) == ["/ratings"]
    assert dict(message.strings) == {
        GLOBAL_INDEX["request.path"]: -1,
        GLOBAL_INDEX["request.method"]: GLOBAL_INDEX["GET"],
    }


def test_the_dictionary_is_istios() -> None:
    assert len(GLOBAL_WORDS) == len(set(GLOBAL_WORDS)) == 202
    assert GLOBAL_WORDS[:3] == ("source.ip", "source.port", "source.name")
    assert GLOBAL_INDEX["destination.service"] == 152
    assert GLOBAL_WORDS[-1] == "context.reporter.kind"


def test_report_deltas() -> None:
    bags = [
        {"destination.service": "ratings", "response.code": 200, "request.path": "/a"},
        {"destination.service": "ratings", "response.code": 503, "request.path": "/a"},
        {"destination.service": "reviews", "response.code": 503, "request.path": "/a"},
    ]
    word = WordTable()
    request = report_pb2.ReportRequest()
    previous: dict[str, object] = {}
    for bag in bags:
        delta = changed(previous, bag)  # type: ignore[arg-type]
        assert delta is not None
        encode_into(delta, request.attributes.add(), word)  # type: ignore[arg-type]
        previous = bag  # type: ignore[assignment]
    request.default_words.extend(word.words)
    assert [len(r.strings) + len(r.int64s) for r in request.attributes] == [3, 1, 1]
    assert decode_report(request) == bags
    assert changed({"a": 1, "b": 2}, {"a": 1}) is None


def test_any_mapping_is_a_string_map_and_other_types_are_refused_by_name() -> None:
    labels = MappingProxyType({"app": "ratings"})
    assert decode(encode({"destination.labels": labels})) == {
        "destination.labels": {"app": "ratings"}
    }
    message = attributes_pb2.CompressedAttributes()
    with pytest.raises(TypeError, match=r"attribute request\.size: cannot send a list"):
        encode_into({"request.size": [1]}, message, WordTable())  # type: ignore[dict-item]


def test_malformed_messages_are_refused() -> None:
    message = attributes_pb2.CompressedAttributes(words=["x"])
    message.strings[-1] = -2
    with pytest.raises(DecodeError, match="word index -2 is past the message dictionary"):
        decode(message)
    message = attributes_pb2.CompressedAttributes()
    message.int64s[GLOBAL_INDEX["response.code"]] = 1
    with pytest.raises(DecodeError, match="past the global dictionary"):
        decode(message, global_word_count=10)
    request = report_pb2.ReportRequest(attributes=[attributes_pb2.CompressedAttributes(), message])
    request.global_word_count = 10
    with pytest.raises(DecodeError, match="record 1: "):
        decode_report(request)


@settings(max_examples=200, deadline=None)
@given(_BAGS)
def test_any_bag_survives_the_plain_form(bag: dict[str, object]) -> None:
    assert read_plain(encode_plain(bag).SerializeToString()) == bag  # type: ignore[arg-type]


def test_the_plain_form_says_each_type_by_its_field() -> None:
    message = encode_plain(
        {
            "source.uid": "kubernetes://reviews-v1.default",
            "source.ip": b"\x7f\x00\x00\x05",
            "source.port": 9080,
            "source.labels": {"app": "reviews"},
        }
    )
    fields = {name: slot.WhichOneof("value") for name, slot in message.attributes.items()}
    assert fields == {
        "source.uid": "string_value",
        "source.ip": "bytes_value",
        "source.port": "int64_value",
        "source.labels": "string_map_value",
    }
    empty = attributes_pb2.Attributes()
    empty.attributes["source.uid"].SetInParent()  # no value set: left out
    assert decode_plain(empty) == {}
    with pytest.raises(DecodeError, match=r"not an istio\.mixer\.v1\.Attributes"):
        read_plain(b"\xff\xff\xff")
    with pytest.raises(TypeError, match=r"attribute source\.port: cannot send a list"):
        encode_plain({"source.port": [1]})  # type: ignore[dict-item]
