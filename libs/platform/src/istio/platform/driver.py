"""What the e2e scenarios need from a platform (local now; docker and kind implement the same).

The scenarios (e2e/) only talk to a `PlatformDriver` and to the mesh's public surfaces: the
ingress URL, istioctl, and Pilot's /debug/syncz. Nothing here sleeps for config: after a rule
change, `wait_for_propagation` polls Pilot (an external process) until every connected proxy
acked config newer than before the change, bounded by a deadline.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

XDS_TYPES = ("cds", "lds", "eds", "rds")
SyncState = dict[tuple[str, str], tuple[str, str]]  # (node, type) -> (sent, acked)


class PropagationTimeout(AssertionError):
    pass


class PlatformDriver(Protocol):
    """One platform running the mesh with Bookinfo for a test session."""

    name: str

    @property
    def ingress_url(self) -> str:
        """Where the ingress gateway serves Bookinfo (`<url>/productpage`)."""
        ...

    @property
    def pilot_address(self) -> str:
        """Pilot's debug address (host:port) for /debug/syncz."""
        ...

    def deploy_bookinfo(self) -> None:
        """Pilot, the ingress gateway and every Bookinfo workload with its sidecar, serving."""
        ...

    def deploy_app(self, name: str, version: str = "v1") -> str:
        """The platform's test app (`istio.platform.echo`, an echo server) as service `name`
        (`http://NAME:9080` in the mesh) with its own sidecar, once it serves and every proxy
        (its own included) acked config that has it; the URL a test reaches it at from outside
        the mesh (its sidecar's inbound listener)."""
        ...

    def remove_app(self, name: str) -> None:
        """Undo `deploy_app`: out of the registry (every proxy acked it), then stopped."""
        ...

    def istioctl(self, *args: str) -> str:
        """Run istioctl against this platform's config store; its stdout, raising on failure."""
        ...

    def apply(self, path: Path) -> float:
        """`istioctl create -f path`, then wait until every proxy has the result; the seconds
        from the store write to the last ack."""
        ...

    def delete(self, path: Path) -> float:
        """`istioctl delete -f path`, then wait as `apply` does."""
        ...

    def reset(self) -> None:
        """Delete every rule applied through this driver, newest first."""
        ...

    def request_from(self, workload: str, url: str, timeout: float = 10.0) -> Response:
        """A plain-HTTP request made as `workload`'s app makes it (through its sidecar)."""
        ...

    def kill_workload(self, workload: str) -> None:
        """Kill the app of one workload (`reviews-v3`), as a crash would."""
        ...

    def inbound_url(self, workload: str) -> str:
        """Where a Bookinfo workload's sidecar takes the mesh's calls (`details-v1`'s
        `http://IP:9080`): what a client without a sidecar would call."""
        ...

    def admin(self, workload: str, path: str) -> Response:
        """GET `path` from a workload's sidecar admin (`/stats`)."""
        ...

    def output(self) -> str:
        """What the platform reported so far (make up's output on the local platform)."""
        ...

    def wait_for_output(self, text: str, timeout: float = 15.0) -> str:
        """The first line the platform reported containing `text`, waiting up to `timeout`."""
        ...

    def teardown(self) -> None: ...


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    seconds: float
    headers: Mapping[str, str]


def http(
    url: str,
    *,
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    proxy: str | None = None,
    timeout: float = 15.0,
) -> Response:
    """One HTTP request, redirects not followed, errors as responses (status 0: no answer)."""
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler({"http": proxy} if proxy else {}),
        _NoRedirect(),
    ]
    opener = urllib.request.build_opener(*handlers)
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    began = time.monotonic()
    try:
        with opener.open(request, timeout=timeout) as answer:
            text = answer.read().decode(errors="replace")
            return Response(answer.status, text, time.monotonic() - began, dict(answer.headers))
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        return Response(error.code, text, time.monotonic() - began, dict(error.headers))
    except OSError as error:
        return Response(0, str(error), time.monotonic() - began, {})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# Bookinfo as a user sees it.

# What legitimately differs between two fetches of the same product page: request ids, timings.
_VARIES = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<request-id>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b"), "<duration>"),
)


def normalise_page(page: str) -> str:
    """A product page with what varies from fetch to fetch replaced (as e2e/golden holds it)."""
    for pattern, replacement in _VARIES:
        page = pattern.sub(replacement, page)
    return page.replace("\r\n", "\n")


_COLORS = re.compile(r'class="stars"[^>]*data-color="(\w+)"')
REVIEWS_UNAVAILABLE = "reviews are currently unavailable"
RATINGS_UNAVAILABLE = "ratings are currently unavailable"


def reviews_version(page: str) -> str:
    """Which reviews version rendered a product page: v1 (no stars), v2 (black), v3 (red),
    or `unavailable`."""
    colors = set(_COLORS.findall(page))
    if colors == {"black"}:
        return "v2"
    if colors == {"red"}:
        return "v3"
    if colors:
        return "mixed:" + ",".join(sorted(colors))
    if REVIEWS_UNAVAILABLE in page:
        return "unavailable"
    return "v1"


def login(ingress_url: str, user: str) -> str:
    """Sign in through productpage's /login; the Cookie header its answer sets."""
    answer = http(f"{ingress_url}/login", data={"username": user, "passwd": "secret"})
    if answer.status not in (302, 303):
        raise AssertionError(f"/login answered {answer.status}: {answer.body[:200]}")
    cookie = answer.headers.get("Set-Cookie", "")
    if not cookie:
        raise AssertionError("/login set no cookie")
    return cookie.split(";", 1)[0]


# Propagation.


def sync_state(pilot_address: str, timeout: float = 5.0) -> SyncState:
    with urllib.request.urlopen(f"http://{pilot_address}/debug/syncz", timeout=timeout) as r:
        streams = json.loads(r.read())
    state: SyncState = {}
    for stream in streams:
        for kind in XDS_TYPES:
            entry = stream["types"].get(kind) or {}
            state[(stream["node"], kind)] = (
                entry.get("sent_version") or "",
                entry.get("acked_version") or "",
            )
    return state


def wait_for_propagation(
    pilot_address: str,
    before: SyncState,
    *,
    proxies: int,
    timeout: float = 15.0,
    interval: float = 0.02,
) -> float:
    """Until at least `proxies` proxies are connected, some version differs from `before` (Pilot
    pushed the change) and every proxy acked every type it was sent; the seconds it took.

    Polls Pilot, an external process, every `interval` up to `timeout`: a change that reaches
    no proxy at all is a failure here, never a silent pass."""
    began = time.monotonic()
    state: SyncState = {}
    while time.monotonic() - began < timeout:
        state = sync_state(pilot_address)
        nodes = {node for node, _ in state}
        changed = any(before.get(key, ("", ""))[0] != sent for key, (sent, _) in state.items())
        synced = all(sent and sent == acked for sent, acked in state.values())
        if len(nodes) >= proxies and changed and synced:
            return time.monotonic() - began
        time.sleep(interval)
    stale = sorted(f"{n} {t}" for (n, t), (s, a) in state.items() if s != a or not s)
    raise PropagationTimeout(
        f"config did not reach every proxy within {timeout:.0f} s: "
        f"{len({n for n, _ in state})}/{proxies} proxies, "
        f"changed={any(before.get(k, ('', ''))[0] != v[0] for k, v in state.items())}, "
        f"not acked: {stale[:8]}"
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
