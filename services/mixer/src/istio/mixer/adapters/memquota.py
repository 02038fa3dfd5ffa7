"""memquota: quotas counted in this process's memory, over rolling windows.

Each quota (by instance name) has a maximum per window (`valid_duration`; 0 means no window:
the maximum is a cap on the total). Requests whose quota instance has the same dimension
values share a bucket; the first override whose dimensions all equal the instance's sets that
bucket's maximum (and window). A retried call (same deduplication id) within
`min_deduplication_duration` gets the first answer again instead of being charged twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from istio.mixersdk import AdapterInfo, Env, QuotaArgs, QuotaInstance, QuotaResult
from istio.mixersdk.adapter import NOT_FOUND
from istio.mixersdk.builtin import MEMQUOTA
from istio.mixersdk.render import text

Clock = Callable[[], float]


class RollingWindow:
    """Amounts allocated within the last `window` seconds (exactly: one entry per distinct
    expiry millisecond), or in total when `window` is 0."""

    __slots__ = ("_entries", "total", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.total = 0
        self._entries: deque[list[float]] = deque()

    def used(self, now: float) -> int:
        entries = self._entries
        while entries and entries[0][0] <= now:
            self.total -= int(entries.popleft()[1])
        return self.total

    def add(self, now: float, amount: int) -> None:
        self.total += amount
        if not self.window:
            return
        expiry = round(now + self.window, 3)
        entries = self._entries
        if entries and entries[-1][0] == expiry:
            entries[-1][1] += amount
        else:
            entries.append([expiry, amount])


@dataclass(frozen=True, slots=True)
class _Limit:
    max_amount: int
    window: timedelta


@dataclass(frozen=True, slots=True)
class _Quota:
    limit: _Limit
    overrides: tuple[tuple[Mapping[str, str], _Limit], ...]

    def limit_for(self, dimensions: Mapping[str, str]) -> _Limit:
        for wanted, limit in self.overrides:
            if all(dimensions.get(k) == v for k, v in wanted.items()):
                return limit
        return self.limit


class MemQuota:
    def __init__(self, params: dict[str, Any], clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.quotas: dict[str, _Quota] = {}
        for quota in params["quotas"]:
            limit = _Limit(quota["max_amount"], quota["valid_duration"])
            overrides = tuple(
                (
                    dict(o["dimensions"]),
                    _Limit(o["max_amount"], o["valid_duration"] or limit.window),
                )
                for o in quota["overrides"]
            )
            self.quotas[quota["name"]] = _Quota(limit, overrides)
        self.dedup_window = params["min_deduplication_duration"].total_seconds()
        self.buckets: dict[tuple[str, tuple[tuple[str, str], ...]], RollingWindow] = {}
        self._seen: OrderedDict[str, tuple[float, QuotaResult]] = OrderedDict()

    def _quota(self, name: str) -> _Quota | None:
        return self.quotas.get(name) or self.quotas.get(name.split(".", 1)[0])

    def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        now = self.clock()
        dedup = f"{args.deduplication_id}/{instance.name}" if args.deduplication_id else ""
        if dedup:
            seen = self._seen
            while seen:
                oldest = next(iter(seen.values()))
                if oldest[0] > now:
                    break
                seen.popitem(last=False)
            previous = seen.get(dedup)
            if previous is not None:
                return previous[1]
        quota = self._quota(instance.name)
        if quota is None:
            return QuotaResult(
                0, timedelta(0), NOT_FOUND, f"no quota {instance.name} is configured"
            )
        dimensions = {k: text(v) for k, v in instance.dimensions.items()}
        limit = quota.limit_for(dimensions)
        key = (instance.name, tuple(sorted(dimensions.items())))
        bucket = self.buckets.get(key)
        if bucket is None or bucket.window != limit.window.total_seconds():
            bucket = self.buckets[key] = RollingWindow(limit.window.total_seconds())
        available = limit.max_amount - bucket.used(now)
        granted = args.amount if available >= args.amount else 0
        if args.best_effort:
            granted = max(0, min(args.amount, available))
        if granted:
            bucket.add(now, granted)
        result = QuotaResult(granted, limit.window)
        if dedup:
            self._seen[dedup] = (now + self.dedup_window, result)
        return result

    async def close(self) -> None:
        return None


async def build(params: dict[str, Any], env: Env) -> MemQuota:
    return MemQuota(params)


INFO = AdapterInfo(
    name="memquota",
    description="Quotas (rate limits) counted in Mixer's memory over rolling windows",
    build=build,
    templates=frozenset({"quota"}),
    params=MEMQUOTA,
)
