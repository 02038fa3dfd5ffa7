"""statsd: metric instances as StatsD lines over UDP.

Each metric instance named in `metrics` becomes `<prefix><name>:<value>|c` (COUNTER), `|g`
(GAUGE) or `|ms` (DISTRIBUTION; durations in milliseconds), its name from `name_template`
(`{{.dimension}}` placeholders filled from the instance's dimensions; the instance name when
empty). A Report's lines go out together, packed into datagrams of at most `flush_bytes`.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from istio.mixersdk import AdapterInfo, Env, MetricInstance
from istio.mixersdk.builtin import STATSD
from istio.mixersdk.render import number, text

_PLACEHOLDER = re.compile(r"\{\{\s*\.([A-Za-z0-9_]+)\s*\}\}")
_TYPES = {"COUNTER": "c", "GAUGE": "g", "DISTRIBUTION": "ms"}


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class Statsd:
    def __init__(self, params: dict[str, Any], transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.prefix: str = params["prefix"]
        self.flush_bytes: int = params["flush_bytes"] or 512
        self.rate: float = params["sampling_rate"]
        self.metrics: dict[str, tuple[str, str]] = {
            name: (spec["name_template"], _TYPES[spec["type"]])
            for name, spec in params["metrics"].items()
        }

    def _line(self, instance: MetricInstance) -> str | None:
        spec = self.metrics.get(instance.name) or self.metrics.get(instance.name.split(".", 1)[0])
        if spec is None:
            return None
        template, kind = spec
        name = (
            _PLACEHOLDER.sub(lambda m: text(instance.dimensions.get(m.group(1))), template)
            if template
            else instance.name.split(".", 1)[0]
        )
        value = instance.value
        amount = value.total_seconds() * 1000 if isinstance(value, timedelta) else number(value)
        shown = int(amount) if amount.is_integer() else amount
        rate = f"|@{self.rate:g}" if self.rate < 1 else ""
        return f"{self.prefix}{name}:{shown}|{kind}{rate}"

    def handle_metric(self, instances: Sequence[MetricInstance]) -> None:
        packet: list[str] = []
        size = 0
        for instance in instances:
            if self.rate < 1 and random.random() >= self.rate:
                continue
            line = self._line(instance)
            if line is None:
                continue
            if packet and size + len(line) + 1 > self.flush_bytes:
                self.transport.sendto("\n".join(packet).encode())
                packet, size = [], 0
            packet.append(line)
            size += len(line) + 1
        if packet:
            self.transport.sendto("\n".join(packet).encode())

    async def close(self) -> None:
        self.transport.close()


async def build(params: dict[str, Any], env: Env) -> Statsd:
    host, port = split_address(params["address"])
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(host, port)
    )
    return Statsd(params, transport)


INFO = AdapterInfo(
    name="statsd",
    description="Metrics as StatsD counters, gauges and timers over UDP",
    build=build,
    templates=frozenset({"metric"}),
    params=STATSD,
)
