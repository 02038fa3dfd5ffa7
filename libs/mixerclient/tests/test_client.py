"""The client's pieces on their own: signatures, the referenced cache's bounds, Report
splitting, and Check through an in-memory transport."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

from istio.api.mixer.v1 import check_pb2, report_pb2
from istio.expr import Value
from istio.mixerclient.attributes import GLOBAL_INDEX, decode_report
from istio.mixerclient.client import (
    ClientOptions,
    MixerClient,
    ReferencedCache,
    encode_report,
    signature,
)

PATTERN = (("request.headers", "x-user", False), ("request.path", None, True))


def test_signature_follows_presence_conditions() -> None:
    assert signature(PATTERN, {"request.headers": {}, "request.path": "/a"}) == ("/a",)
    assert signature(PATTERN, {"request.path": "/a"}) == ("/a",)
    assert signature(PATTERN, {"request.headers": {"x-user": "j"}, "request.path": "/a"}) is None
    assert signature(PATTERN, {"request.headers": {}}) is None


def test_signature_reads_any_mapping() -> None:
    headers = MappingProxyType({"x-user": "j"})
    assert signature((("request.headers", "x-user", True),), {"request.headers": headers}) == ("j",)
    whole = signature((("request.headers", None, True),), {"request.headers": headers})
    assert whole == (frozenset({("x-user", "j")}),)


def test_cache_bounds() -> None:
    cache: ReferencedCache[int] = ReferencedCache(capacity=2, max_patterns=1)
    for i in range(3):
        cache.put(PATTERN, {"request.path": f"/{i}"}, i)
    assert list(cache.entries.values()) == [1, 2]
    other = (("request.method", None, True),)
    cache.put(other, {"request.method": "GET"}, 9)
    assert list(cache.patterns) == [other]
    assert list(cache.entries.values()) == [9]


def test_report_split_where_an_attribute_is_dropped() -> None:
    batch = [{"a.b": "1", "c.d": 2}, {"a.b": "1", "c.d": 3}, {"c.d": 3}, {"c.d": 4}]
    requests = encode_report(batch)  # type: ignore[arg-type]
    assert [count for _, count in requests] == [2, 2]
    assert [bag for request, _ in requests for bag in decode_report(request)] == batch


class Canned:
    """Answers every Check with a denial referencing request.path, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def check(self, request: bytes) -> bytes:
        self.calls += 1
        response = check_pb2.CheckResponse()
        precondition = response.precondition
        precondition.status.code = 7
        precondition.valid_duration.FromSeconds(10)
        precondition.valid_use_count = 100
        match = precondition.referenced_attributes.attribute_matches.add()
        match.name = GLOBAL_INDEX["request.path"]
        match.condition = check_pb2.ReferencedAttributes.EXACT
        return response.SerializeToString()

    async def report(self, request: bytes) -> bytes:
        return b""


async def test_answers_are_reused_for_the_same_referenced_values() -> None:
    transport = Canned()
    client = MixerClient(transport, clock=lambda: 0.0)
    first = await client.check({"request.path": "/x", "request.id": "1"})
    second = await client.check({"request.path": "/x", "request.id": "2"})
    third = await client.check({"request.path": "/y"})
    assert [(a.status_code, a.cached) for a in (first, second, third)] == [
        (7, False),
        (7, True),
        (7, False),
    ]
    assert transport.calls == 2
    again = await client.check({"request.path": "/x", "request.id": "3"})
    assert (again.status_code, again.cached, transport.calls) == (7, True, 2)
    assert client.stats.check_cache_hits == 2
    client.clear_cache()
    assert (await client.check({"request.path": "/x"})).cached is False


async def test_the_cache_answers_without_a_coroutine_when_it_can() -> None:
    transport = Canned()
    client = MixerClient(transport, clock=lambda: 0.0)
    assert client.check_cached({"request.path": "/x"}) is None  # nothing cached: ask
    await client.check({"request.path": "/x"})
    answer = client.check_cached({"request.path": "/x", "request.id": "2"})
    assert answer is not None
    assert (answer.status_code, answer.cached, transport.calls) == (7, True, 1)
    assert client.check_cached({"request.path": "/y"}) is None
    assert (client.stats.checks, client.stats.check_cache_hits) == (2, 1)


class Recording:
    """Keeps every Report's records; Check is not expected."""

    def __init__(self) -> None:
        self.records: list[dict[str, Value]] = []

    async def check(self, request: bytes) -> bytes:
        raise AssertionError("no Check expected")

    async def report(self, request: bytes) -> bytes:
        self.records += decode_report(report_pb2.ReportRequest.FromString(request))
        return b""


async def test_reports_carry_every_record_and_drop_only_one_the_wire_cannot_carry() -> None:
    transport = Recording()
    client = MixerClient(transport, ClientOptions(report_batch_entries=3))
    client.report({"request.path": "/a", "response.code": 200})
    bad = {"request.path": "/b", "response.code": 200, "request.size": [1]}
    client.report(bad)  # type: ignore[arg-type]
    client.report({"request.path": "/c", "response.code": 200})
    client.report({"request.path": "/d"})  # drops response.code: a new Report in the batch
    assert transport.records == []  # batched: 3 records not reached, the interval not passed
    await client.flush()
    assert transport.records == [
        {"request.path": "/a", "response.code": 200},
        {"request.path": "/c", "response.code": 200},
        {"request.path": "/d"},
    ]
    assert (client.stats.reports_sent, client.stats.report_records) == (2, 3)


class Allowing(Canned):
    """Answers OK (10 s, 100 uses); each call waits for `release` when one is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Event | None = None

    async def check(self, request: bytes) -> bytes:
        if self.release is not None:
            await self.release.wait()
        reply = check_pb2.CheckResponse.FromString(await super().check(request))
        reply.precondition.status.code = 0
        return reply.SerializeToString()


async def test_an_answer_about_to_run_out_is_refreshed_once_in_the_background() -> None:
    transport = Allowing()
    now = [0.0]
    client = MixerClient(transport, clock=lambda: now[0])
    bag = {"request.path": "/x"}
    assert (await client.check(bag)).ok
    assert transport.calls == 1
    now[0] = 7.9  # within the first 80% of the valid duration: answered from the cache
    assert (await client.check(bag)).cached
    assert transport.calls == 1
    now[0] = 8.5  # past it: still answered at once, while one call refreshes the entry
    transport.release = asyncio.Event()
    answers = [await client.check(bag) for _ in range(5)]
    assert all(a.ok and a.cached for a in answers)
    assert client.stats.check_refreshes == 1
    transport.release.set()
    await client.close()
    assert transport.calls == 2
    now[0] = 12.0  # the first answer would have expired at 10 s: the refreshed one serves
    assert (await client.check(bag)).cached
    assert transport.calls == 2


async def test_an_answer_near_its_use_count_is_refreshed() -> None:
    transport = Allowing()
    client = MixerClient(transport, clock=lambda: 0.0)
    bag = {"request.path": "/x"}
    for _ in range(80):  # the first call, then 79 of its 99 cached uses
        assert (await client.check(bag)).ok
    assert client.stats.check_refreshes == 0
    assert (await client.check(bag)).cached  # 20 uses left: time to ask again
    await client.close()
    assert (client.stats.check_refreshes, transport.calls) == (1, 2)
