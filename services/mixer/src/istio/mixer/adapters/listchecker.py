"""listchecker: whether a value is in a list (a whitelist, or a blacklist).

The list is `overrides` plus, when `provider_url` is set, the entries fetched from it (one per
line; blank lines and `#` comments ignored), fetched at start and every `refresh_interval`. A
fetched list is trusted for `ttl` after the last successful fetch; past that (or before the
first success) checks fail with UNAVAILABLE rather than guess. Entries are strings, strings
compared case-insensitively, or IP addresses and CIDR ranges (`entry_type`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from istio.mixersdk import AdapterInfo, CheckResult, Env, ListEntryInstance
from istio.mixersdk.adapter import INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE
from istio.mixersdk.builtin import LISTCHECKER
from istio.mixersdk.render import text

FETCH_TIMEOUT = 10.0
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListChecker:
    def __init__(
        self, params: dict[str, Any], env: Env, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.env = env
        self.clock = clock
        self.entry_type: str = params["entry_type"]
        self.blacklist: bool = params["blacklist"]
        self.provider_url: str = params["provider_url"]
        self.refresh_interval: float = params["refresh_interval"].total_seconds()
        self.ttl: float = params["ttl"].total_seconds()
        self.valid_duration = params["caching_interval"]
        self.valid_use_count: int = params["caching_use_count"]
        self._passed = CheckResult(
            valid_duration=self.valid_duration, valid_use_count=self.valid_use_count
        )  # the same answer every time: made once
        self.overrides: list[str] = params["overrides"]
        self.strings: frozenset[str] = frozenset()
        self.networks: tuple[_Network, ...] = ()
        self.fetched_at: float | None = None
        self.last_error = ""
        self._refresher: asyncio.Task[None] | None = None
        self.refreshed = asyncio.Event()  # set after each successful fetch (for watchers)
        self._set_entries(self.overrides)

    def _set_entries(self, entries: Iterable[str]) -> None:
        """Parse the entries (ValueError naming the bad one)."""
        entries = [e.strip() for e in entries if e.strip() and not e.strip().startswith("#")]
        if self.entry_type == "IP_ADDRESSES":
            networks = []
            for entry in entries:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
            self.networks = tuple(networks)
        elif self.entry_type == "CASE_INSENSITIVE_STRINGS":
            self.strings = frozenset(e.lower() for e in entries)
        else:
            self.strings = frozenset(entries)

    async def start(self) -> None:
        if not self.provider_url:
            return
        await self.refresh()
        self._refresher = asyncio.create_task(
            self._refresh_forever(), name=f"list {self.env.handler}"
        )

    async def refresh(self) -> None:
        """Fetch the list once; on failure keep the previous one (until its ttl runs out)."""
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.provider_url) as response,
            ):
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.text()
            self._set_entries([*self.overrides, *body.splitlines()])
        except (TimeoutError, aiohttp.ClientError, ValueError, UnicodeDecodeError) as error:
            self.last_error = f"cannot fetch {self.provider_url}: {error or type(error).__name__}"
            self.env.logger.warning("%s: %s", self.env.handler, self.last_error)
            return
        self.fetched_at = self.clock()
        self.last_error = ""
        self.refreshed.set()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self.refresh()

    def contains(self, value: object) -> bool:
        if self.entry_type == "IP_ADDRESSES":
            address = ipaddress.ip_address(value if isinstance(value, bytes) else str(value))
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            return any(address in network for network in self.networks)
        if self.entry_type == "CASE_INSENSITIVE_STRINGS":
            return str(value).lower() in self.strings
        return str(value) in self.strings

    def handle_list_entry(self, instance: ListEntryInstance) -> CheckResult:
        if self.provider_url and (
            self.fetched_at is None or self.clock() - self.fetched_at > self.ttl
        ):
            reason = self.last_error or "the list has not been fetched yet"
            return CheckResult(
                UNAVAILABLE, f"list unavailable: {reason}", self.valid_duration * 0, 1
            )
        try:
            found = self.contains(instance.value)
        except ValueError:
            return CheckResult(
                INVALID_ARGUMENT,
                f"{text(instance.value)} is not an IP address",
                self.valid_duration,
                self.valid_use_count,
            )
        if self.blacklist and found:
            return CheckResult(
                PERMISSION_DENIED,
                f"{text(instance.value)} is blacklisted",
                self.valid_duration,
                self.valid_use_count,
            )
        if not self.blacklist and not found:
            return CheckResult(
                NOT_FOUND,
                f"{text(instance.value)} is not whitelisted",
                self.valid_duration,
                self.valid_use_count,
            )
        return self._passed

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher


async def build(params: dict[str, Any], env: Env) -> ListChecker:
    checker = ListChecker(params, env)
    await checker.start()
    return checker


INFO = AdapterInfo(
    name="listchecker",
    description="Whitelists and blacklists of strings or IP ranges, inline or fetched from a URL",
    build=build,
    templates=frozenset({"listentry"}),
    params=LISTCHECKER,
)
