"""Mixer Reports made by the reporter process (`--mixer-reports process`, pilot-agent's default):
records reach a real `mixs` with 0.2's default telemetry as the same metrics inline reports
give; the last records are sent when the proxy closes; a reporter that dies is started again;
filters keep their records apart when their slots are reused; and a reporter too far behind
costs dropped records, counted, never the proxy's memory."""

from __future__ import annotations

import asyncio
import marshal
import re
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from istio.api.mixer.v1 import report_pb2
from istio.mixerclient.attributes import decode_report
from istio.mixerclient.client import MixerClient
from istio.proxy import mixer_reports
from istio.proxy.config import MixerFilter
from istio.proxy.mixer import Mixers, RequestRecord
from istio.proxy.mixer_reports import Reporter, ReporterProcess
from istio.proxy.stats import Stats
from istio.testing.mixer import MixerServer, serve

INSTALL = Path(__file__).resolve().parents[3] / "install" / "mixer"
LABELS = {"app": "reviews", "version": "v2"}


@pytest.fixture
async def mixer(tmp_path: Path) -> AsyncIterator[MixerServer]:
    config = tmp_path / "mixer"
    config.mkdir()
    for name in ("attributes.yaml", "telemetry.yaml"):
        shutil.copy(INSTALL / name, config / name)
    async with serve(config) as server:
        yield server


def destination(address: str, service: str) -> MixerFilter:
    return MixerFilter(
        address, True, {"destination.service": service, "destination.labels": dict(LABELS)}
    )


def request(index: int) -> RequestRecord:
    return (
        "GET",
        f"/reviews/{index}",
        "reviews:9080",
        [(b"host", b"reviews:9080"), (b"user-agent", b"test")],
        f"id-{index}",
        "127.0.0.1",
        "",
        False,
        time.time_ns(),
    )


def report(
    mixers: Mixers, mixer: MixerFilter, index: int, status: int = 200, response_bytes: int = 1
) -> None:
    """A request's Report, as the proxy queues one when the response has ended."""
    mixers.report_request(
        mixer,
        request(index),
        None,
        status=status,
        request_bytes=0,
        response_bytes=response_bytes,
        duration=0.001,
        time_ns=time.time_ns(),
    )


async def metric(server: MixerServer, name: str, service: str, code: str = "") -> float:
    async with aiohttp.ClientSession() as session, session.get(server.metrics_url) as answer:
        text = await answer.text()
    pattern = re.compile(
        rf'^{name}(?:_total)?\{{[^}}]*destination_service="{re.escape(service)}"'
        + (rf'[^}}]*response_code="{code}"' if code else "")
    )
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if pattern.match(line))


async def test_the_reporter_process_reports_requests_and_connections(mixer: MixerServer) -> None:
    mixers = Mixers("process")
    reviews = destination(mixer.address, "reviews.default.svc.cluster.local")
    mongo = destination(mixer.address, "mongo.default.svc.cluster.local")
    for index in range(30):
        report(mixers, reviews, index, status=200 if index % 3 else 503, response_bytes=7)
    mixers.report_connection(
        mongo,
        (("10.0.0.7", 41000), "", False),
        None,
        received=1200,
        sent=345,
        duration=0.5,
        time_ns=time.time_ns(),
        denial_code=0,
        denial_message="",
    )
    reporter = mixers.reporter
    assert reporter is not None
    assert reporter.process is not None
    # The reporter tells the proxy what it sent (within a second or so of sending it).
    async with asyncio.timeout(20):
        while reporter.counters.get("report_records", 0) < 31:
            reporter.told.clear()
            await reporter.told.wait()
    assert reporter.counters == {"report_total": 2, "report_records": 31, "report_failures": 0}
    # Closing sends what is queued and waits for the reporter to have sent its Reports.
    await mixers.close()
    assert reporter.process.returncode == 0
    assert (reporter.records, reporter.lost, reporter.restarts) == (31, 0, 0)
    collected = Stats()
    mixers.collect(collected)
    assert collected.protocols["mixer"]["reporter"].counters == {
        "records": 31,
        "records_lost": 0,
        "restarts": 0,
        "report_total": 2,
        "report_records": 31,
        "report_failures": 0,
    }
    service = "reviews.default.svc.cluster.local"
    assert await metric(mixer, "request_count", service, "200") == 20
    assert await metric(mixer, "request_count", service, "503") == 10
    assert await metric(mixer, "response_size_sum", service) == 30 * 7
    mongo_service = "mongo.default.svc.cluster.local"
    assert await metric(mixer, "tcp_bytes_received", mongo_service) == 1200
    assert await metric(mixer, "tcp_bytes_sent", mongo_service) == 345


async def test_a_reporter_that_dies_is_started_again(
    mixer: MixerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mixer_reports, "RESTART_FIRST", 0.0)  # no pause before the restart
    mixers = Mixers("process")
    before = destination(mixer.address, "before.default.svc.cluster.local")
    after = destination(mixer.address, "after.default.svc.cluster.local")
    report(mixers, before, 0)
    reporter = mixers.reporter
    assert reporter is not None
    assert reporter.process is not None
    assert reporter._gone is not None
    first = reporter.process
    first.send_signal(signal.SIGKILL)
    await reporter._gone.wait()  # the proxy's end saw the reporter's close
    assert reporter.sock is None
    assert first.wait() == -signal.SIGKILL
    for index in range(5):
        report(mixers, after, index)
    assert reporter.process is not first
    assert reporter.restarts == 1
    await mixers.close()
    assert await metric(mixer, "request_count", "after.default.svc.cluster.local") == 5


class Capture:
    """A Mixer transport that keeps every Report's bags."""

    def __init__(self) -> None:
        self.bags: list[dict[str, Any]] = []

    async def check(self, request: bytes) -> bytes:
        raise AssertionError("the reporter never checks")

    async def report(self, request: bytes) -> bytes:
        self.bags += decode_report(report_pb2.ReportRequest.FromString(request))
        return b""


def channel(reporter: ReporterProcess) -> socket.socket:
    """Connect `reporter` to a socket this test reads, instead of a process."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reporter.sock = ours
    return theirs


def disconnect(reporter: ReporterProcess, theirs: socket.socket) -> None:
    reporter._closing = True  # not started again
    reporter._lost("the test is over")
    theirs.close()


def replay(theirs: socket.socket, reporter: Reporter) -> None:
    """Feed the frames written so far to `reporter`, as the reporter process reads them."""
    theirs.setblocking(False)
    data = b""
    while True:
        try:
            chunk = theirs.recv(1 << 20)
        except BlockingIOError:
            break
        data += chunk
    while data:
        size = int.from_bytes(data[:4], "big")
        for record in marshal.loads(data[4 : 4 + size]):
            reporter.apply(record)
        data = data[4 + size :]


async def test_slots_are_reused_and_each_record_keeps_its_destination() -> None:
    proxy_end = ReporterProcess()
    theirs = channel(proxy_end)
    capture = Capture()
    reporter = Reporter()
    reporter.mixers.clients["mixer:9091"] = MixerClient(capture)
    filters = [
        destination("mixer:9091", f"s{index}.default.svc.cluster.local")
        for index in range(mixer_reports.SLOTS + 44)
    ]
    for round_ in range(2):  # the second round redefines filters whose slots were given away
        for index, mixer in enumerate(filters):
            proxy_end.request(mixer, request(index), 200, 0, round_, 0.001, time.time_ns())
        proxy_end.flush()
        replay(theirs, reporter)
    await reporter.mixers.close()
    assert len(capture.bags) == 2 * len(filters)
    for position, bag in enumerate(capture.bags):
        index = position % len(filters)
        assert bag["destination.service"] == f"s{index}.default.svc.cluster.local"
        assert bag["request.path"] == f"/reviews/{index}"
        assert bag["response.size"] == position // len(filters)
    assert proxy_end.lost == 0
    disconnect(proxy_end, theirs)


async def test_a_reporter_far_behind_leaves_the_reports_to_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the reporter does not keep up (here: nobody reads its end), the proxy holds at
    most BACKLOG_BYTES of written records and makes the next Reports itself: none is lost."""
    monkeypatch.setattr(mixer_reports, "BACKLOG_BYTES", 64 * 1024)
    capture = Capture()
    mixers = Mixers("process")
    mixers.clients["mixer:9091"] = MixerClient(capture)
    proxy_end = mixers.reporter = ReporterProcess(fallback=Reporter(mixers))
    theirs = channel(proxy_end)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mixer = destination("mixer:9091", "reviews.default.svc.cluster.local")
    sent = 0
    while not capture.bags:
        for index in range(100):
            report(mixers, mixer, index, response_bytes=sent + index)
        sent += 100
        proxy_end.flush()
        await mixers.clients["mixer:9091"].flush()
        assert sent < 1_000_000, "the proxy never made a Report itself"
    assert len(proxy_end.backlog) <= mixer_reports.BACKLOG_BYTES + 2 * 100 * 200
    taken = proxy_end.records
    assert taken + len(capture.bags) == sent  # every record: written, or reported inline
    assert [bag["response.size"] for bag in capture.bags] == list(range(taken, sent))
    assert all(
        bag["destination.service"] == "reviews.default.svc.cluster.local" for bag in capture.bags
    )
    disconnect(proxy_end, theirs)


async def test_records_taken_when_the_reporter_dies_are_made_inline() -> None:
    capture = Capture()
    mixers = Mixers("process")
    mixers.clients["mixer:9091"] = MixerClient(capture)
    proxy_end = mixers.reporter = ReporterProcess(fallback=Reporter(mixers))
    theirs = channel(proxy_end)
    mixer = destination("mixer:9091", "reviews.default.svc.cluster.local")
    for index in range(3):
        assert proxy_end.request(mixer, request(index), 200, 0, index, 0.001, time.time_ns())
    proxy_end._closing = True  # (not started again: the test has no process to start)
    proxy_end._lost("killed")  # before the frame was written
    proxy_end.flush()
    await mixers.clients["mixer:9091"].flush()
    assert [bag["response.size"] for bag in capture.bags] == [0, 1, 2]
    assert proxy_end.lost == 0
    theirs.close()
