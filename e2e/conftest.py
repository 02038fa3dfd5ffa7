"""The e2e session: one platform with Bookinfo for every scenario, rules removed after each.

The platform is the local one (a fresh MESH_DIR under pytest's tmp, on 127.0.1.0/24, or
$E2E_NETWORK, so a mesh the user runs with `make up` is never disturbed); docker and kind
drivers will plug in here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from istio.platform.driver import percentile
from istio.platform.local.driver import LocalDriver
from istio.testing import zipkin as zipkin_collector

# E2E_NETWORK picks another /24 of 127/8, so that two runs on one machine do not collide.
NETWORK = os.environ.get("E2E_NETWORK", "127.0.1")
# External hosts the egress scenario serves on loopback; the platform maps them in its hosts file.
EXTERNAL = {"allowed.e2e.test": f"{NETWORK}.200", "blocked.e2e.test": f"{NETWORK}.201"}
EXTERNAL_PORT = 18080
# The Zipkin collector every proxy of the mesh sends its spans to.
ZIPKIN = (f"{NETWORK}.202", 9411)

_drivers: list[LocalDriver] = []


@pytest.fixture(scope="session")
def zipkin() -> Iterator[zipkin_collector.Collector]:
    with zipkin_collector.serve(*ZIPKIN) as collector:
        yield collector


@pytest.fixture(scope="session")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, zipkin: zipkin_collector.Collector
) -> Iterator[LocalDriver]:
    driver = LocalDriver(
        tmp_path_factory.mktemp("mesh"),
        network=NETWORK,
        hosts=EXTERNAL,
        zipkin_address=f"{ZIPKIN[0]}:{ZIPKIN[1]}",
    )
    _drivers.append(driver)
    try:
        driver.deploy_bookinfo()
        yield driver
    finally:
        driver.teardown()


@pytest.fixture(autouse=True)
def clean_rules(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "mesh" in request.fixturenames:
        request.getfixturevalue("mesh").reset()


class _External(BaseHTTPRequestHandler):
    hits: dict[str, list[str]] = {}

    def do_GET(self) -> None:
        host = self.headers.get("Host", "")
        for name, seen in self.hits.items():
            if host.split(":")[0] == name.split(":")[0]:
                seen.append(host)
        body = f"external {host}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def external() -> Iterator[dict[str, list[str]]]:
    """A server on loopback per external name the platform's hosts file maps; what each saw
    (Host headers), keyed `name:port`."""
    hits: dict[str, list[str]] = {f"{name}:{EXTERNAL_PORT}": [] for name in EXTERNAL}
    handler = type("External", (_External,), {"hits": hits})
    servers = [ThreadingHTTPServer((ip, EXTERNAL_PORT), handler) for ip in EXTERNAL.values()]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield hits
    for server, thread in zip(servers, threads, strict=True):
        server.shutdown()
        server.server_close()
        thread.join()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scenarios that leave the shared mesh changed for good (`breaks_mesh`: a killed
    workload) run after all the others, whatever module they are in (sort is stable)."""
    items.sort(key=lambda item: item.get_closest_marker("breaks_mesh") is not None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for driver in _drivers:
        times = driver.propagation
        if times:
            terminalreporter.write_line(
                f"e2e ({driver.name}): rule propagation to every proxy over {len(times)} "
                f"changes: p50 {percentile(times, 0.5) * 1000:.0f} ms, "
                f"p99 {percentile(times, 0.99) * 1000:.0f} ms"
            )
