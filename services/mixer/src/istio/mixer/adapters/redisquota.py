"""redisquota: quotas counted in Redis, so that every Mixer replica shares them.

Each allocation is one Lua script run (atomic in Redis):

- FIXED_WINDOW: a counter per bucket that expires `valid_duration` after its first
  allocation; a request is granted while the counter stays within the maximum.
- ROLLING_WINDOW: a sorted set per bucket of allocations scored by Redis' own clock (so
  replicas agree), rounded down to `bucket_duration` when set; allocations older than
  `valid_duration` are dropped before counting.

A bucket is the quota name and the instance's dimensions; the first override whose
dimensions all equal the instance's sets that bucket's maximum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from istio.mixersdk import AdapterInfo, Env, QuotaArgs, QuotaInstance, QuotaResult
from istio.mixersdk.adapter import NOT_FOUND, UNAVAILABLE
from istio.mixersdk.builtin import REDISQUOTA
from istio.mixersdk.render import text

KEY_PREFIX = "istio:quota:"

# KEYS[1] counter; ARGV: amount, max, window ms, best effort (1/0). Returns {granted, ttl ms}.
FIXED_WINDOW = """
local amount = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = amount
if max - used < amount then
  if ARGV[4] == '1' then granted = math.max(max - used, 0) else granted = 0 end
end
if granted > 0 then
  if redis.call('INCRBY', KEYS[1], granted) == granted then
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then ttl = tonumber(ARGV[3]) end
return {granted, ttl}
"""

# KEYS[1] sorted set of "seq:amount" scored by time ms, KEYS[2] the sequence counter;
# ARGV: amount, max, window ms, best effort, bucket ms. Returns {granted, window ms}.
ROLLING_WINDOW = """
local amount = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local bucket = tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if bucket > 0 then now = now - (now % bucket) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  used = used + tonumber(string.match(member, ':(%d+)$'))
end
local granted = amount
if max - used < amount then
  if ARGV[4] == '1' then granted = math.max(max - used, 0) else granted = 0 end
end
if granted > 0 then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], now, seq .. ':' .. granted)
  redis.call('PEXPIRE', KEYS[1], window)
  redis.call('PEXPIRE', KEYS[2], window)
end
return {granted, window}
"""


@dataclass(frozen=True, slots=True)
class _Quota:
    max_amount: int
    window: timedelta
    bucket: timedelta
    algorithm: str
    overrides: tuple[tuple[Mapping[str, str], int], ...]

    def max_for(self, dimensions: Mapping[str, str]) -> int:
        for wanted, amount in self.overrides:
            if all(dimensions.get(k) == v for k, v in wanted.items()):
                return amount
        return self.max_amount


def redis_url(address: str) -> str:
    return address if "://" in address else f"redis://{address}"


class RedisQuota:
    def __init__(
        self, params: dict[str, Any], client: redis.Redis, pool: redis.BlockingConnectionPool
    ) -> None:
        self.client = client
        self.pool = pool
        self.quotas = {
            q["name"]: _Quota(
                q["max_amount"],
                q["valid_duration"],
                q["bucket_duration"],
                q["rate_limit_algorithm"],
                tuple((dict(o["dimensions"]), o["max_amount"]) for o in q["overrides"]),
            )
            for q in params["quotas"]
        }
        self.fixed = client.register_script(FIXED_WINDOW)
        self.rolling = client.register_script(ROLLING_WINDOW)

    async def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        quota = self.quotas.get(instance.name) or self.quotas.get(instance.name.split(".", 1)[0])
        if quota is None:
            return QuotaResult(
                0, timedelta(0), NOT_FOUND, f"no quota {instance.name} is configured"
            )
        dimensions = {k: text(v) for k, v in sorted(instance.dimensions.items())}
        digest = hashlib.sha256(repr(sorted(dimensions.items())).encode()).hexdigest()[:24]
        key = f"{KEY_PREFIX}{instance.name}:{digest}"
        window_ms = max(1, round(quota.window.total_seconds() * 1000))
        best_effort = "1" if args.best_effort else "0"
        arguments: list[int | str] = [
            args.amount,
            quota.max_for(dimensions),
            window_ms,
            best_effort,
        ]
        try:
            if quota.algorithm == "ROLLING_WINDOW":
                bucket_ms = round(quota.bucket.total_seconds() * 1000)
                granted, ttl = await self.rolling(
                    keys=[key, key + ":seq"], args=[*arguments, bucket_ms]
                )
            else:
                granted, ttl = await self.fixed(keys=[key], args=arguments)
        except RedisError as error:
            return QuotaResult(0, timedelta(0), UNAVAILABLE, f"redis: {error}")
        return QuotaResult(int(granted), timedelta(milliseconds=int(ttl)))

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()


async def build(params: dict[str, Any], env: Env) -> RedisQuota:
    # Connections are made on first use: a Redis that is down fails allocations (UNAVAILABLE),
    # not the config.
    # A blocking pool: past connection_pool_size, calls wait for a connection (up to the
    # handler's deadline) instead of failing.
    pool = redis.BlockingConnectionPool.from_url(
        redis_url(params["redis_server_url"]),
        max_connections=params["connection_pool_size"],
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )
    return RedisQuota(params, redis.Redis(connection_pool=pool), pool)


INFO = AdapterInfo(
    name="redisquota",
    description="Quotas shared through Redis: fixed or rolling windows, one atomic Lua call each",
    build=build,
    templates=frozenset({"quota"}),
    params=REDISQUOTA,
)
