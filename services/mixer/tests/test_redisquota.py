"""redisquota against a real redis-server: fixed and rolling windows, overrides, best effort,
two handlers (two Mixer replicas) sharing one count, and a Redis that is down."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from istio.mixer.adapters import redisquota
from istio.mixersdk import Env, QuotaArgs, QuotaInstance, parse_params
from istio.mixersdk.builtin import REDISQUOTA
from istio.testing.net import free_port

ENV = Env("handler.redisquota.istio-system", logging.getLogger("test"))


async def handler_for(port: int, algorithm: str, window: str = "1s", **extra: Any) -> Any:
    spec = {
        "redisServerUrl": f"127.0.0.1:{port}",
        "quotas": [
            {
                "name": "requestcount.quota.istio-system",
                "maxAmount": 3,
                "validDuration": window,
                "rateLimitAlgorithm": algorithm,
                "overrides": [{"dimensions": {"destination": "reviews"}, "maxAmount": 1}],
                **extra,
            }
        ],
    }
    parsed, problems = parse_params(REDISQUOTA, spec)
    assert problems == []
    return await redisquota.build(parsed, ENV)


def instance(destination: str) -> QuotaInstance:
    return QuotaInstance("requestcount.quota.istio-system", {"destination": destination})


async def grants(handler: Any, destination: str, count: int, amount: int = 1) -> list[int]:
    results = []
    for _ in range(count):
        result = await handler.handle_quota(instance(destination), QuotaArgs("q", amount))
        assert result.status_code == 0, result.message
        results.append(result.granted)
    return results


async def test_fixed_window(redis_server: Any) -> None:
    first = await handler_for(redis_server.port, "FIXED_WINDOW", "1s")
    second = await handler_for(redis_server.port, "FIXED_WINDOW", "1s")
    try:
        # Two replicas share the count.
        assert await grants(first, "ratings", 2) + await grants(second, "ratings", 2) == [
            1,
            1,
            1,
            0,
        ]
        assert await grants(first, "reviews", 2) == [1, 0]
        partial = await first.handle_quota(instance("details"), QuotaArgs("q", 5, best_effort=True))
        assert partial.granted == 3
        assert timedelta(0) < partial.valid_duration <= timedelta(seconds=1)
        # The window ends one valid_duration after its first allocation.
        await asyncio.sleep(1.1)
        assert await grants(second, "ratings", 1) == [1]
    finally:
        await first.close()
        await second.close()


async def test_rolling_window(redis_server: Any) -> None:
    handler = await handler_for(redis_server.port, "ROLLING_WINDOW", "1s", bucketDuration="100ms")
    try:
        assert await grants(handler, "ratings", 2) == [1, 1]
        await asyncio.sleep(0.6)
        assert await grants(handler, "ratings", 2) == [1, 0]
        # After the first two leave the window (1 s after them), two more fit; not three.
        await asyncio.sleep(0.55)
        assert await grants(handler, "ratings", 3) == [1, 1, 0]
        assert await grants(handler, "reviews", 2) == [1, 0]
    finally:
        await handler.close()


async def test_redis_down_fails_the_allocation_not_mixer() -> None:
    handler = await handler_for(free_port(), "FIXED_WINDOW")
    try:
        result = await handler.handle_quota(instance("ratings"), QuotaArgs("q", 1))
        assert (result.granted, result.status_code) == (0, 14)
        assert result.message.startswith("redis: ")
    finally:
        await handler.close()
