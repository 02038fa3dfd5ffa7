"""A Mixer client as a sidecar needs one: Check answers cached, quota prefetched, Reports
batched; over any transport that moves the serialized messages (`Transport`).

Theory of operation.

- Check cache (`ReferencedCache`). Mixer says which attributes its answer depended on
  (referenced attributes: present with this value, or absent; for maps, per key). The cache
  remembers each distinct set of references as a *pattern*, and each answer under the
  pattern's *signature* for the request (the referenced values). A new request is looked up
  under every known pattern whose presence conditions it meets; an answer is reused until its
  valid_duration passes or its valid_use_count is spent. At most `check_cache_entries`
  answers (least recently used go first), as 0.2's client kept 10,000.
- Quota prefetch. A quota is granted from a local pool, keyed the same way by the quota's
  referenced attributes. An empty pool is refilled through Check asking, best effort, for
  what the last second used (at least the amount needed); grants expire with their
  valid_duration. Without prefetch, every quota is asked for exactly, all or nothing.
- Failures. A transport failure (or a reply that does not parse) allows the request when
  `fail_open` (0.2's network_fail_open default) and denies it with UNAVAILABLE otherwise;
  nothing is cached then.
- Reports. Each bag is delta-encoded into the batch as it is queued (`ReportEncoder`: one
  shared dictionary per Report, a new Report where a record drops an attribute of the one
  before, which a delta cannot say); the batch is sent when it holds `report_batch_entries`
  records or is `report_batch_interval` seconds old. Encoding as bags come spreads the cost
  over the requests (a batch of 1,000 encoded at once held a proxy's loop for tens of
  milliseconds) and keeps no bag longer than the next one needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeVar

from google.protobuf.duration_pb2 import Duration

from istio.api.mixer.v1 import check_pb2, report_pb2
from istio.expr import Value
from istio.mixerclient.attributes import (
    DecodeError,
    WordTable,
    changed,
    encode,
    encode_into,
    referenced_words,
)

log = logging.getLogger(__name__)

OK = 0
UNAVAILABLE = 14
RESOURCE_EXHAUSTED = 8
_EXACT = check_pb2.ReferencedAttributes.EXACT

Clock = Callable[[], float]


class Transport(Protocol):
    """Carries serialized requests to Mixer and its serialized answers back (gRPC, or a
    proxy's own HTTP/2 client); raises on any failure."""

    async def check(self, request: bytes) -> bytes: ...

    async def report(self, request: bytes) -> bytes: ...


# A cached Check answer is asked for again once this share of its valid duration (or of its
# use count) is spent.
REFRESH_AT = 0.8


@dataclass(frozen=True, slots=True)
class ClientOptions:
    check_cache_entries: int = 10_000
    fail_open: bool = True
    report_batch_entries: int = 1000
    report_batch_interval: float = 1.0
    quota_prefetch: bool = True
    quota_cache_entries: int = 10_000
    max_patterns: int = 100  # distinct referenced-attribute sets kept


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    """Whether a request may go on: OK (0), or the denial's google.rpc code and message."""

    status_code: int
    message: str = ""
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code == OK


@dataclass(slots=True)
class ClientStats:
    checks: int = 0
    check_cache_hits: int = 0
    check_calls: int = 0
    check_refreshes: int = 0
    quota_pool_hits: int = 0
    transport_failures: int = 0
    reports_sent: int = 0
    report_records: int = 0
    report_failures: int = 0


Reference = tuple[str, str | None, bool]  # attribute, map key, present
Pattern = tuple[Reference, ...]


def _hashable(value: Value) -> Hashable:
    if type(value) is str:  # the common case, without the Mapping ABC's slower check
        return value
    if isinstance(value, Mapping):
        return frozenset(value.items())
    if isinstance(value, datetime | timedelta):
        return value
    return value  # str, int, float, bool, bytes


def signature(pattern: Pattern, bag: Mapping[str, Value]) -> tuple[Hashable, ...] | None:
    """The referenced values of `bag` under `pattern`, or None when `bag` does not meet the
    pattern's presence conditions (so the pattern cannot say anything about it)."""
    values: list[Hashable] = []
    for name, key, present in pattern:
        value = bag.get(name)
        if key is not None:
            value = value.get(key) if type(value) is dict or isinstance(value, Mapping) else None
        if (value is not None) != present:
            return None
        if present:
            assert value is not None
            values.append(_hashable(value))
    return tuple(values)


E = TypeVar("E")


class ReferencedCache(Generic[E]):
    """Entries keyed by the values of the attributes they were decided on."""

    def __init__(self, capacity: int, max_patterns: int) -> None:
        self.capacity = capacity
        self.max_patterns = max_patterns
        self.patterns: OrderedDict[Pattern, None] = OrderedDict()
        self.entries: OrderedDict[tuple[Pattern, tuple[Hashable, ...]], E] = OrderedDict()

    def find(
        self, bag: Mapping[str, Value]
    ) -> tuple[tuple[Pattern, tuple[Hashable, ...]], E] | None:
        entries = self.entries
        for pattern in reversed(self.patterns):
            values = signature(pattern, bag)
            if values is None:
                continue
            key = (pattern, values)
            entry = entries.get(key)
            if entry is not None:
                entries.move_to_end(key)
                return key, entry
        return None

    def put(self, pattern: Pattern, bag: Mapping[str, Value], entry: E) -> None:
        values = signature(pattern, bag)
        if values is None:  # the server's references do not describe this bag: do not cache
            return
        self.patterns[pattern] = None
        self.patterns.move_to_end(pattern)
        while len(self.patterns) > self.max_patterns:
            dropped, _ = self.patterns.popitem(last=False)
            for key in [k for k in self.entries if k[0] == dropped]:
                del self.entries[key]
        self.entries[(pattern, values)] = entry
        self.entries.move_to_end((pattern, values))
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def drop(self, key: tuple[Pattern, tuple[Hashable, ...]]) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.patterns.clear()
        self.entries.clear()


@dataclass(slots=True)
class _CheckEntry:
    answer: CheckAnswer  # as a cache hit returns it (cached=True), made once
    expires: float
    uses_left: int
    # Refresh ahead: past this time, or down to this many uses, one hit asks Mixer again in
    # the background while the answer still serves. Without it every connection's next
    # request misses at once when the answer runs out, and they all wait for Mixer.
    refresh_at: float = 0.0
    refresh_uses: int = 0
    refreshing: bool = False


@dataclass(slots=True)
class _QuotaPool:
    available: int
    expires: float


@dataclass(slots=True)
class _QuotaDemand:
    """How much of one quota the recent requests used, for sizing prefetches."""

    times: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, amount: int) -> None:
        self.times.append((now, amount))
        self.total += amount

    def last_second(self, now: float) -> int:
        while self.times and self.times[0][0] <= now - 1.0:
            self.total -= self.times.popleft()[1]
        return self.total


def _pattern(referenced: check_pb2.ReferencedAttributes) -> Pattern:
    return tuple(
        sorted(
            (name, key, condition == _EXACT)
            for name, condition, key in referenced_words(referenced)
        )
    )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


class MixerClient:
    """Check (with cache and quotas) and Report (batched) through `transport`."""

    def __init__(
        self,
        transport: Transport,
        options: ClientOptions | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.transport = transport
        self.options = options or ClientOptions()
        self.clock = clock
        self.stats = ClientStats()
        self.check_cache: ReferencedCache[_CheckEntry] = ReferencedCache(
            self.options.check_cache_entries, self.options.max_patterns
        )
        self.quota_pools: dict[str, ReferencedCache[_QuotaPool]] = {}
        self._demand: dict[str, _QuotaDemand] = {}
        self._batch = ReportEncoder()
        self._flusher: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._refreshing: set[asyncio.Task[CheckAnswer]] = set()

    # Check.

    async def check(
        self,
        attributes: Mapping[str, Value],
        quotas: Mapping[str, int] | None = None,
        deduplication_id: str = "",
    ) -> CheckAnswer:
        """May the request described by `attributes` go on, with `quotas` charged?"""
        self.stats.checks += 1
        now = self.clock()
        cached = self._cached_check(attributes, now)
        if cached is not None and (not cached.ok or not quotas):
            self.stats.check_cache_hits += 1
            return cached
        wanted = quotas or {}
        for name, amount in wanted.items():
            self._demand.setdefault(name, _QuotaDemand()).add(now, amount)
        missing = {
            name: amount
            for name, amount in wanted.items()
            if not self._take_from_pool(name, attributes, amount, now)
        }
        if cached is not None and not missing:
            self.stats.check_cache_hits += 1
            return cached
        return await self._call_check(attributes, missing, deduplication_id, now)

    def check_cached(self, attributes: Mapping[str, Value]) -> CheckAnswer | None:
        """`check` for a request that charges no quota, when the cache has the answer (None:
        ask `check`). No coroutine: this is the Check of nearly every request."""
        cached = self._cached_check(attributes, self.clock())
        if cached is not None:
            stats = self.stats
            stats.checks += 1
            stats.check_cache_hits += 1
        return cached

    def _cached_check(self, attributes: Mapping[str, Value], now: float) -> CheckAnswer | None:
        found = self.check_cache.find(attributes)
        if found is None:
            return None
        key, entry = found
        if entry.expires <= now or entry.uses_left <= 0:
            self.check_cache.drop(key)
            return None
        entry.uses_left -= 1
        # (an answer whose last use this was is not refreshed: the next request asks in line)
        if not entry.refreshing and (
            now >= entry.refresh_at or 0 < entry.uses_left <= entry.refresh_uses
        ):
            entry.refreshing = True
            self._refresh(attributes)
        return entry.answer

    def _refresh(self, attributes: Mapping[str, Value]) -> None:
        """Ask Mixer again for a cached answer about to run out; its reply replaces the entry
        (a failed call leaves it to expire, and the next request asks in line)."""
        self.stats.check_refreshes += 1
        bag = dict(attributes)  # the request's bag may change once it is reported
        task = asyncio.get_running_loop().create_task(self._call_check(bag, {}, "", self.clock()))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    def _take_from_pool(
        self, name: str, attributes: Mapping[str, Value], amount: int, now: float
    ) -> bool:
        pools = self.quota_pools.get(name)
        if pools is None:
            return False
        found = pools.find(attributes)
        if found is None:
            return False
        key, pool = found
        if pool.expires <= now:
            pools.drop(key)
            return False
        if pool.available < amount:
            return False
        pool.available -= amount
        self.stats.quota_pool_hits += 1
        return True

    async def _call_check(
        self,
        attributes: Mapping[str, Value],
        quotas: Mapping[str, int],
        deduplication_id: str,
        now: float,
    ) -> CheckAnswer:
        request = check_pb2.CheckRequest(
            attributes=encode(attributes), deduplication_id=deduplication_id
        )
        asked: dict[str, int] = {}
        for name, amount in quotas.items():
            params = request.quotas[name]
            if self.options.quota_prefetch:
                asked[name] = max(amount, self._demand[name].last_second(now))
                params.best_effort = True
            else:
                asked[name] = amount
            params.amount = asked[name]
        self.stats.check_calls += 1
        try:
            reply = await self.transport.check(request.SerializeToString())
            response = check_pb2.CheckResponse.FromString(reply)
        except Exception as error:  # the transport's failures, or a reply that does not parse
            self.stats.transport_failures += 1
            log.warning(
                "Mixer check failed (%s): %s",
                "allowing" if self.options.fail_open else "denying",
                error,
            )
            if self.options.fail_open:
                return CheckAnswer(OK)
            return CheckAnswer(UNAVAILABLE, f"Mixer is unavailable: {error}")
        precondition = response.precondition
        try:
            pattern = _pattern(precondition.referenced_attributes)
        except DecodeError as error:
            log.warning("Mixer's referenced attributes do not decode: %s", error)
            pattern = None
        valid = _seconds(precondition.valid_duration)
        if pattern is not None and valid > 0 and precondition.valid_use_count > 0:
            self.check_cache.put(
                pattern,
                attributes,
                _CheckEntry(
                    CheckAnswer(precondition.status.code, precondition.status.message, cached=True),
                    now + valid,
                    precondition.valid_use_count - 1,
                    refresh_at=now + valid * REFRESH_AT,
                    refresh_uses=int(precondition.valid_use_count * (1 - REFRESH_AT)),
                ),
            )
        if precondition.status.code != OK:
            return CheckAnswer(precondition.status.code, precondition.status.message)
        for name, amount in quotas.items():
            result = response.quotas.get(name)
            granted = result.granted_amount if result is not None else 0
            if granted >= amount:
                leftover = granted - amount
                if leftover > 0 and result is not None:
                    self._keep(name, attributes, result, leftover, now)
                continue
            if granted > 0 and result is not None:
                self._keep(name, attributes, result, granted, now)
            return CheckAnswer(RESOURCE_EXHAUSTED, f"quota {name} exhausted")
        return CheckAnswer(OK)

    def _keep(
        self,
        name: str,
        attributes: Mapping[str, Value],
        result: check_pb2.CheckResponse.QuotaResult,
        amount: int,
        now: float,
    ) -> None:
        valid = _seconds(result.valid_duration)
        if not self.options.quota_prefetch or valid <= 0:
            return
        try:
            pattern = _pattern(result.referenced_attributes)
        except DecodeError:
            return
        pools = self.quota_pools.setdefault(
            name, ReferencedCache(self.options.quota_cache_entries, self.options.max_patterns)
        )
        found = pools.find(attributes)
        if found is not None and found[1].expires > now:
            found[1].available += amount
            return
        pools.put(pattern, attributes, _QuotaPool(amount, now + valid))

    def clear_cache(self) -> None:
        """Forget every cached answer and quota pool (e.g. when told the config changed)."""
        self.check_cache.clear()
        self.quota_pools.clear()

    # Report.

    def report(self, attributes: Mapping[str, Value]) -> None:
        """Queue one request's (or connection's) attributes for the next Report."""
        try:
            self._batch.add(attributes)
        except TypeError as error:  # a value the wire has no type for: that record only
            log.warning("Mixer report record dropped: %s", error)
            return
        if len(self._batch) >= self.options.report_batch_entries:
            self._send_batch()
        elif self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.options.report_batch_interval, self._send_batch)

    def _send_batch(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        batch, self._batch = self._batch, ReportEncoder()
        if not len(batch):
            return
        task = asyncio.get_running_loop().create_task(self._send(batch.finish()))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, requests: list[tuple[report_pb2.ReportRequest, int]]) -> None:
        for request, count in requests:
            try:
                await self.transport.report(request.SerializeToString())
            except Exception as error:
                self.stats.report_failures += 1
                log.warning("Mixer report of %d records failed: %s", count, error)
                continue
            self.stats.reports_sent += 1
            self.stats.report_records += count

    async def flush(self) -> None:
        """Send what is queued and wait for every Report in flight."""
        self._send_batch()
        if self._sending:
            await asyncio.gather(*list(self._sending))

    async def close(self) -> None:
        await self.flush()
        if self._refreshing:
            await asyncio.gather(*list(self._refreshing), return_exceptions=True)


class ReportEncoder:
    """Report requests built one record at a time: each record the delta from the one before
    under one dictionary per request, a new request where a record lacks an attribute of the
    one before (a delta cannot remove one)."""

    __slots__ = ("_count", "_previous", "_request", "_requests", "_total", "_word")

    def __init__(self) -> None:
        self._requests: list[tuple[report_pb2.ReportRequest, int]] = []
        self._total = 0
        self._start()

    def _start(self) -> None:
        self._request = report_pb2.ReportRequest()
        self._word = WordTable()
        self._previous: Mapping[str, Value] = {}
        self._count = 0

    def _close(self) -> None:
        self._request.default_words.extend(self._word.words)
        self._requests.append((self._request, self._count))
        self._start()

    def __len__(self) -> int:
        """Records added."""
        return self._total

    def add(self, bag: Mapping[str, Value]) -> None:
        """Append `bag` as the next record; TypeError (and nothing added) for a value the wire
        has no type for."""
        delta = changed(self._previous, bag) if self._count else bag
        if delta is None:
            self._close()
            delta = bag
        records = self._request.attributes
        try:
            encode_into(delta, records.add(), self._word)
        except TypeError:
            del records[-1]  # its words stay in the dictionary, unused: harmless
            raise
        self._previous = bag
        self._count += 1
        self._total += 1

    def finish(self) -> list[tuple[report_pb2.ReportRequest, int]]:
        """The requests (with their record counts); the encoder is spent."""
        if self._count:
            self._close()
        return self._requests


def encode_report(batch: list[Mapping[str, Value]]) -> list[tuple[report_pb2.ReportRequest, int]]:
    """The batch as Report requests (with record counts): deltas under one dictionary, a new
    request where a record lacks an attribute of the one before."""
    encoder = ReportEncoder()
    for bag in batch:
        encoder.add(bag)
    return encoder.finish()
