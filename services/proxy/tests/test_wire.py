"""istio.proxy.wire against protobuf itself: every field of the proxy's schema decodes to what
protobuf decodes from the same bytes (Pilot's golden xDS), unknown fields are skipped, bad
buffers are refused, and the DiscoveryRequest it writes is what protobuf reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, symbol_database

from istio.pilot.xds import generate
from istio.proxy import envoy, wire
from istio.proxy.xds import CLUSTER, XdsState

assert generate  # registers the descriptors of every type Pilot packs in an Any (json_format)
GOLDEN = Path(__file__).parents[2] / "pilot" / "tests" / "golden"


def same(ours: wire.Message, theirs: Any, path: str) -> int:
    """Asserts every field of our schema equals protobuf's; the number of fields compared."""
    compared = 0
    for field in type(ours).FIELDS.values():
        here = f"{path}.{field.name}"
        mine, expected = getattr(ours, field.name), getattr(theirs, field.name)
        if field.kind == wire.MAP:
            assert set(mine) == set(expected), here
            for key in mine:
                compared += check(field.target[1], field.target[2], mine[key], expected[key], here)
        elif field.repeated:
            assert len(mine) == len(expected), here
            for a, b in zip(mine, expected, strict=True):
                compared += check(field.kind, field.target, a, b, here)
        else:
            if field.kind in (wire.MESSAGE, wire.OPAQUE) or field.oneof:
                assert ours.HasField(field.name) == theirs.HasField(field.name), here
            compared += check(field.kind, field.target, mine, expected, here)
    return compared


def check(kind: int, target: Any, mine: Any, expected: Any, path: str) -> int:
    if kind == wire.MESSAGE:
        return same(mine, expected, path) + 1
    if kind == wire.OPAQUE:
        assert mine == expected.SerializeToString(), path
    else:
        assert mine == expected, path
    return 1


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in GOLDEN.glob("*.json") if "lds" in p.read_text())
)
def test_every_field_decodes_as_protobuf_decodes_it(name: str) -> None:
    document = json.loads((GOLDEN / f"{name}.json").read_text())
    types = {
        "cds": (cluster_pb2.Cluster, envoy.Cluster),
        "lds": (listener_pb2.Listener, envoy.Listener),
        "rds": (route_pb2.RouteConfiguration, envoy.RouteConfiguration),
    }
    compared = 0
    for short, (theirs, ours) in types.items():
        for key, body in document.get(short, {}).items():
            message = json_format.ParseDict(body, theirs())
            data = message.SerializeToString()
            compared += same(ours.decode(data), message, f"{name}/{short}/{key}")
            # The Any-packed filters and TLS contexts, field by field.
            for packed in _anys(message):
                inner_type = packed.type_url.rpartition("/")[2]
                if inner_type in envoy.BY_FULL_NAME:
                    inner = envoy.BY_FULL_NAME[inner_type].decode(packed.value)
                    real = symbol_database.Default().GetSymbol(inner_type)()
                    real.ParseFromString(packed.value)
                    compared += same(inner, real, f"{name}/{short}/{key}:{inner_type}")
    assert compared > 0


def _anys(message: Any) -> list[Any]:
    found = []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        values = value.values() if field.message_type.GetOptions().map_entry else None
        if values is None:
            values = value if field.is_repeated else [value]
        for item in values:
            if not hasattr(item, "ListFields"):
                continue
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                found.append(item)
                inner_type = item.type_url.rpartition("/")[2]
                with_inner = symbol_database.Default().GetSymbol(inner_type)()
                with_inner.ParseFromString(item.value)
                found += _anys(with_inner)
            else:
                found += _anys(item)
    return found


def test_unknown_fields_are_skipped_and_known_ones_kept() -> None:
    route = route_components_pb2.Route(name="r")
    route.match.prefix = "/"
    route.route.cluster = "c"
    data = route.SerializeToString()
    unknown = (
        bytes([999 << 3 & 0x7F | 0x80, 999 >> 4, 0x05])  # field 999, varint 5
        + bytes([(998 << 3 | 2) & 0x7F | 0x80, 998 >> 4, 3])
        + b"abc"  # field 998, 3 bytes
        + bytes([(997 << 3 | 5) & 0x7F | 0x80, 997 >> 4])
        + b"\x00\x00\x80\x3f"  # field 997, fixed32
        + bytes([(996 << 3 | 1) & 0x7F | 0x80, 996 >> 4])
        + b"\x00" * 8  # field 996, fixed64
    )
    decoded = envoy.Route.decode(unknown + data + unknown)
    assert same(decoded, route_components_pb2.Route.FromString(unknown + data + unknown), "r")
    assert (decoded.name, decoded.match.prefix, decoded.route.cluster) == ("r", "/", "c")
    assert decoded.WhichOneof("action") == "route"
    # a known field with another wire type than its own is skipped too (as protobuf does)
    assert envoy.Route.decode(bytes([1 << 3 | 0, 7]) + data).name == "r"


def test_protobuf_rules_last_oneof_wins_messages_merge_repeated_packed_or_not() -> None:
    first = route_components_pb2.Route()
    first.route.cluster = "a"
    first.route.timeout.seconds = 3
    second = route_components_pb2.Route()
    second.route.timeout.nanos = 5
    third = route_components_pb2.Route()
    third.redirect.host_redirect = "h"
    merged = route_components_pb2.Route()
    merged.MergeFromString(first.SerializeToString() + second.SerializeToString())
    ours = envoy.Route.decode(first.SerializeToString() + second.SerializeToString())
    assert (ours.route.cluster, ours.route.timeout.seconds, ours.route.timeout.nanos) == ("a", 3, 5)
    assert same(ours, merged, "merged") > 0
    switched = envoy.Route.decode(first.SerializeToString() + third.SerializeToString())
    assert switched.WhichOneof("action") == "redirect"
    assert not switched.HasField("route")
    assert switched.route.cluster == ""  # the default, as protobuf gives
    policy = route_components_pb2.RetryPolicy(retriable_status_codes=[503, 504])
    packed = policy.SerializeToString()
    unpacked = b"".join(bytes([7 << 3, code & 0x7F | 0x80, code >> 7]) for code in (500, 502))
    retry = envoy.RetryPolicy.decode(packed + unpacked)
    assert list(retry.retriable_status_codes) == [503, 504, 500, 502]


def test_bad_buffers_are_refused_and_nacked() -> None:
    cluster = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.EDS)
    data = cluster.SerializeToString()
    for bad in (data[:-1], b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x07", b"\x08" + b"\xff" * 11):
        with pytest.raises(wire.DecodeError):
            envoy.Cluster.decode(bad)
    state = XdsState()
    holder = any_pb2.Any(type_url=CLUSTER, value=data[:-1])
    error = state.accept(CLUSTER, "1", [holder])
    assert error is not None
    assert error.startswith("undecodable cds resource")


def test_a_field_outside_the_schema_is_an_error_not_a_default() -> None:
    with pytest.raises(AttributeError, match="no field 'dns_lookup_family'"):
        _ = envoy.Cluster().dns_lookup_family
    with pytest.raises(ValueError, match="no oneof"):
        envoy.Cluster().WhichOneof("nope")


def test_the_discovery_request_is_what_protobuf_reads() -> None:
    metadata = {"INTERCEPTION_MODE": "NONE", "n": 3, "ok": True, "list": ["a", 1.5], "x": None}
    data = wire.discovery_request(
        type_url=CLUSTER,
        version_info="v1",
        resource_names=["b", "a"],
        response_nonce="n1",
        node_id="sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local",
        node_cluster="istio-proxy",
        node_user_agent="istio-proxy",
        node_metadata=metadata,
        error_code=3,
        error_message="bad",
    )
    request = discovery_pb2.DiscoveryRequest.FromString(data)
    assert (request.type_url, request.version_info, list(request.resource_names)) == (
        CLUSTER,
        "v1",
        ["b", "a"],
    )
    assert (request.response_nonce, request.error_detail.code, request.error_detail.message) == (
        "n1",
        3,
        "bad",
    )
    assert request.node.id.startswith("sidecar~")
    assert (request.node.cluster, request.node.user_agent_name) == ("istio-proxy", "istio-proxy")
    expected = struct_pb2.Struct()
    expected.update(metadata)
    assert request.node.metadata == expected
    plain = discovery_pb2.DiscoveryRequest.FromString(wire.discovery_request(type_url=CLUSTER))
    assert plain == discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    assert not plain.HasField("node")
    assert not plain.HasField("error_detail")


def test_struct_values_read_as_json_format_reads_them() -> None:
    value = struct_pb2.Struct()
    value.update({"a": 1, "b": "x", "c": {"d": [True, None, 2.5]}, "e": []})
    ours = envoy.Struct.decode(value.SerializeToString())
    assert wire.to_python(ours) == json_format.MessageToDict(value)


def test_negative_and_multi_byte_varints_and_bools() -> None:
    duration = duration_pb2.Duration(seconds=-5, nanos=-3)
    ours = envoy.Duration.decode(duration.SerializeToString())
    assert (ours.seconds, ours.nanos) == (-5, -3)
    big = duration_pb2.Duration(seconds=315_576_000_000, nanos=999_999_999)
    ours = envoy.Duration.decode(big.SerializeToString())
    assert (ours.seconds, ours.nanos) == (315_576_000_000, 999_999_999)
    assert envoy.BoolValue.decode(b"\x08\x02").value is True  # any non-zero varint is true
    assert envoy.BoolValue.decode(b"\x08\x00").value is False
    assert envoy.UInt32Value.decode(b"\x08\xff\xff\xff\xff\x0f").value == 0xFFFFFFFF
