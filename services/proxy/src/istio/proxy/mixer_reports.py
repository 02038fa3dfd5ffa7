"""Mixer Reports off the request path: the reporter process.

Why a process: making a request's Report record (its attribute bag, the delta against the
record before, the protobuf wire form) cost the proxy about a sixth of what the whole request
costs it (docs/benchmarks.md, "The proxy with Mixer on"), and CPython runs one process's Python
on one core at a time. So the proxy hands each finished request to a reporter process in its
raw form (the few plain values its bag is made of: `istio.proxy.mixer.RequestRecord`), and the
reporter builds the bags, batches them and sends the Reports, on CPU the request path does not
want: it runs SCHED_IDLE. Check stays in the proxy: its answer gates the request, and from the
cache it costs a few microseconds.

The channel is a socketpair; the reporter's end is an inherited fd (no path, no port), and the
reporter is `python -m istio.proxy.mixer_reports --fd N` with the proxy's own interpreter. The
proxy writes frames, each a 4-byte length and a `marshal` of a list of records, every 50 ms or
2,048 records; the records, in order:

    (DEFINE, slot, address, attributes)   a Mixer filter: where its records' Reports go and
                                          the destination's attributes (a slot is given to
                                          another filter once 256 are in use)
    (REQUEST, slot, record, status, request bytes, response bytes, duration, time ns)
    (CONNECTION, slot, record, received, sent, duration, time ns, denial code, message)

marshal, not pickle: both ends are the same interpreter and the records are plain tuples, which
marshal writes fastest (about 0.5 µs a record here).

No Report waits on the reporter. When it is not there (not started yet, died, or cannot be
started: it is started again after 1 s, doubling to 30 s) or has fallen more than 4 MB of
records behind (the cores were all busy), the proxy makes the Reports itself, inline, as
`--mixer-reports inline` does, until it catches up; records it had taken and could not write
are made inline too. What a reporter that dies takes with it (its batch, up to a second of
records) is lost, and logged, as 0.2's Reports were best effort. At shutdown the proxy sends what
it holds and closes its end: the reporter sends every Report it has batched and exits. The
reporter ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): the proxy's end
closing, at its exit or death, is what ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from istio.proxy.config import MixerFilter
from istio.proxy.mixer import ConnectionRecord, Mixers, RequestRecord

log = logging.getLogger(__name__)

DEFINE, REQUEST, CONNECTION = 0, 1, 2
SLOTS = 256
# Written records the reporter has not taken yet, beyond what the socket holds: past this the
# proxy makes Reports itself (inline) until the reporter catches up.
BACKLOG_BYTES = 4 * 1024 * 1024
# A frame is written once its records reach this many, or this long after its first: a write
# per loop turn cost the request path more than the records themselves, and the reporter works
# through a large frame for less CPU per record than through many small ones (Reports wait up
# to a second for their batch anyway).
FRAME_RECORDS = 2048
FRAME_INTERVAL = 0.05
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
CLOSE_TIMEOUT = 10.0
COUNTERS_INTERVAL = 1.0


class ReporterProcess:
    """The proxy's end: records queued up to 50 ms, written to the reporter process
    (started at the first record, and again after it is gone). A record it does not take
    (`request` and `connection` answer False: the reporter is down, or behind) is the
    caller's to report inline; records it took but could not write go to `fallback`."""

    def __init__(self, fallback: Reporter | None = None) -> None:
        self.fallback = fallback
        self.process: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pending: list[tuple[Any, ...]] = []
        self.backlog = bytearray()  # written bytes the socket did not take yet
        self.slots: dict[int, tuple[MixerFilter, int]] = {}  # id(filter): (filter, slot)
        self.free_slots = list(range(SLOTS - 1, -1, -1))
        self.records = 0  # taken
        self.lost = 0  # taken, then gone with a reporter that died
        self.restarts = 0
        self._restart_at = 0.0
        self._restart_delay = RESTART_FIRST
        self._timer: asyncio.TimerHandle | None = None  # the pending frame's flush
        self._closing = False
        self._gone: asyncio.Event | None = None  # set when the reporter closed its end
        self._drained: asyncio.Event | None = None  # set when the backlog is written (close)
        # The reporter's own counters (its Reports sent and failed), as it last said them, and
        # what reporters before it said.
        self.counters: dict[str, int] = {}
        self._earlier: dict[str, int] = {}
        self._said = b""
        self.told = asyncio.Event()  # set when the reporter said its counters

    # The request path.

    def request(
        self,
        mixer: MixerFilter,
        record: RequestRecord,
        status: int,
        request_bytes: int,
        response_bytes: int,
        duration: float,
        time_ns: int,
    ) -> bool:
        """Take a finished request's Report; False when the caller must make it."""
        if not self._taking():
            return False
        slot = self._slot(mixer)
        self._queue(
            (REQUEST, slot, record, status, request_bytes, response_bytes, duration, time_ns)
        )
        return True

    def connection(
        self,
        mixer: MixerFilter,
        record: ConnectionRecord,
        received: int,
        sent: int,
        duration: float,
        time_ns: int,
        denial_code: int,
        denial_message: str,
    ) -> bool:
        """Take a closed connection's Report; False when the caller must make it."""
        if not self._taking():
            return False
        slot = self._slot(mixer)
        self._queue(
            (CONNECTION, slot, record, received, sent, duration, time_ns, denial_code,
             denial_message)
        )  # fmt: skip
        return True

    def _taking(self) -> bool:
        """Whether the reporter is there (started now if need be) and not too far behind."""
        if self.sock is None and not self._start():
            return False
        return len(self.backlog) <= BACKLOG_BYTES

    def _slot(self, mixer: MixerFilter) -> int:
        """The filter's slot, defined to the reporter first if it has none."""
        found = self.slots.get(id(mixer))  # (the filter is held there: its id stays its own)
        if found is not None:
            return found[1]
        if not self.free_slots:
            # The oldest filter gives up its slot (its records were all sent before: the
            # stream is ordered); a later record of it is defined again.
            oldest = next(iter(self.slots))
            self.free_slots.append(self.slots.pop(oldest)[1])
        slot = self.free_slots.pop()
        self.slots[id(mixer)] = (mixer, slot)
        self.pending.append((DEFINE, slot, mixer.address, plain(mixer.attributes)))
        return slot

    def _queue(self, record: tuple[Any, ...]) -> None:
        self.pending.append(record)
        self.records += 1
        if len(self.pending) >= FRAME_RECORDS:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FRAME_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write the queued records as one frame (to `fallback` if the reporter is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending:
            return
        records, self.pending = self.pending, []
        sock = self.sock
        if sock is None:
            self._hand_back(records)
            return
        data = marshal.dumps(records)
        frame = len(data).to_bytes(4, "big") + data
        if self.backlog:
            self.backlog += frame
            return
        try:
            written = sock.send(frame)
        except BlockingIOError:
            written = 0
        except OSError as error:
            self._lost(f"cannot write to it: {error}")
            self._hand_back(records)
            return
        if written < len(frame):
            self.backlog += frame[written:]
            asyncio.get_running_loop().add_writer(sock, self._write_backlog)

    def _write_backlog(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            written = sock.send(self.backlog)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"cannot write to it: {error}")
            return
        del self.backlog[:written]
        if not self.backlog:
            asyncio.get_running_loop().remove_writer(sock)
            if self._drained is not None:
                self._drained.set()

    def _hand_back(self, records: list[tuple[Any, ...]]) -> None:
        """Records taken but never written: reported by `fallback` (or counted lost)."""
        if self.fallback is None:
            self.lost += sum(1 for record in records if record[0] != DEFINE)
            return
        for record in records:
            self.fallback.apply(record)

    # The reporter's lifetime.

    def _start(self) -> bool:
        """Start the reporter (not before its restart time); False if it is not running."""
        if self._closing or time.monotonic() < self._restart_at:
            return False
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [*reporter_argv(), "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except OSError as error:
            ours.close()
            self._retry_later(f"cannot start it: {error}")
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._gone = asyncio.Event()
        self.slots.clear()  # a new reporter knows no filter yet
        self.free_slots = list(range(SLOTS - 1, -1, -1))
        asyncio.get_running_loop().add_reader(ours, self._readable)
        log.info("Mixer reporter process %d started", self.process.pid)
        return True

    def _readable(self) -> None:
        """The reporter's counters (a JSON line whenever they change), or its end closed."""
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost("it exited")
            return
        self._said += data
        *lines, self._said = self._said.split(b"\n")
        if lines:
            with contextlib.suppress(ValueError):
                self.counters = {k: int(v) for k, v in json.loads(lines[-1]).items()}
                self.told.set()

    def totals(self) -> dict[str, int]:
        """The reporter's counters since the first one started (restarts do not reset them)."""
        return {
            name: self._earlier.get(name, 0) + self.counters.get(name, 0)
            for name in {*self._earlier, *self.counters}
        }

    def _lost(self, why: str) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        sock.close()
        self._earlier = self.totals()  # what the gone reporter said counts on
        self.counters = {}
        self._said = b""
        if self.backlog:
            log.warning("Mixer reporter gone with %d bytes of records unsent", len(self.backlog))
            self.backlog.clear()
        code = self.process.poll() if self.process is not None else None
        if self._gone is not None:
            self._gone.set()
        if self._closing:
            return
        self.restarts += 1
        self._retry_later(f"{why}, exit status {code}")

    def _retry_later(self, why: str) -> None:
        log.warning("Mixer reporter process: %s; starting again in %gs", why, self._restart_delay)
        self._restart_at = time.monotonic() + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, RESTART_MAX)

    async def close(self) -> None:
        """Send what is queued, close the channel and wait for the reporter to have sent its
        last Reports and exited (at most CLOSE_TIMEOUT; then it is killed)."""
        self.flush()
        self._closing = True
        sock, process, gone = self.sock, self.process, self._gone
        if sock is None or process is None or gone is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self.backlog:
                    self._drained = asyncio.Event()
                    await first_of(self._drained, gone)
                if self.sock is not None:
                    sock.shutdown(socket.SHUT_WR)
                    await gone.wait()
                await asyncio.to_thread(process.wait)
        except (TimeoutError, OSError) as error:
            log.warning("Mixer reporter did not finish (%s): killing it", error or "timeout")
            process.kill()
            await asyncio.to_thread(process.wait)
        self._lost("closed")


async def first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def plain(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A filter's attributes as marshal writes them (maps as dicts)."""
    return {
        name: dict(value) if isinstance(value, Mapping) else value
        for name, value in attributes.items()
    }


def reporter_argv() -> list[str]:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return [sys.executable, "-m", "istio.proxy.mixer_reports", "--log-level", level]


# The reporter process.


class Reporter:
    """Records to Reports: each record's bag made as the proxy's inline reports make it, and
    batched by `mixers`' clients. The reporter process runs one; the proxy keeps one for the
    records it took and could not write."""

    def __init__(self, mixers: Mixers | None = None) -> None:
        self.mixers = mixers if mixers is not None else Mixers("inline")
        self.filters: dict[int, MixerFilter] = {}
        self.records = 0

    def apply(self, record: tuple[Any, ...]) -> None:
        kind, slot = record[0], record[1]
        if kind == DEFINE:
            self.filters[slot] = MixerFilter(record[2], True, record[3])
            return
        mixer = self.filters[slot]
        self.records += 1
        if kind == REQUEST:
            _, _, request, status, request_bytes, response_bytes, duration, time_ns = record
            self.mixers.report_request(
                mixer,
                request,
                None,
                status=status,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                duration=duration,
                time_ns=time_ns,
                inline=True,
            )
        elif kind == CONNECTION:
            _, _, connection, received, sent, duration, time_ns, code, message = record
            self.mixers.report_connection(
                mixer,
                connection,
                None,
                received=received,
                sent=sent,
                duration=duration,
                time_ns=time_ns,
                denial_code=code,
                denial_message=message,
                inline=True,
            )
        else:
            raise ValueError(f"unknown record kind {kind}")

    def counters(self) -> dict[str, int]:
        """This reporter's Reports, summed over its Mixer clients."""
        totals = {"report_total": 0, "report_records": 0, "report_failures": 0}
        for client in self.mixers.clients.values():
            totals["report_total"] += client.stats.reports_sent
            totals["report_records"] += client.stats.report_records
            totals["report_failures"] += client.stats.report_failures
        return totals

    async def _tell(self, writer: asyncio.StreamWriter) -> None:
        """Tell the proxy this reporter's counters once a second when they changed (it shows
        them in its stats)."""
        said: dict[str, int] = {}
        while True:
            await asyncio.sleep(COUNTERS_INTERVAL)  # a period, not a wait for an event
            counters = self.counters()
            if counters != said:
                writer.write(json.dumps(counters).encode() + b"\n")
                said = counters

    async def serve(self, sock: socket.socket) -> None:
        """Read frames until the proxy closes its end; then send every batched Report."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        telling = asyncio.get_running_loop().create_task(self._tell(writer))
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                    data = await reader.readexactly(int.from_bytes(head, "big"))
                except asyncio.IncompleteReadError:
                    break
                for record in marshal.loads(data):
                    try:
                        self.apply(record)
                    except Exception:  # one bad record: that one only
                        log.exception("Mixer reporter: a record not reported")
        finally:
            telling.cancel()
            await self.mixers.close()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        log.info("Mixer reporter: %d records reported; exiting", self.records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m istio.proxy.mixer_reports")
    parser.add_argument("--fd", type=int, required=True, help="the proxy's channel")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # CPU nobody else wants: the request path (the proxy, its app, their clients) always goes
    # first. When none is left, the backlog grows and the proxy makes Reports itself.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as error:  # not Linux, or a sandbox that refuses it
        log.warning("Mixer reporter keeps its CPU priority (SCHED_IDLE: %s)", error)
        os.nice(10)
    sock = socket.socket(fileno=args.fd)
    try:
        import uvloop
    except ImportError:
        asyncio.run(Reporter().serve(sock))
    else:
        uvloop.run(Reporter().serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
