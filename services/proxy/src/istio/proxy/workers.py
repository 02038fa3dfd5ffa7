"""The worker processes of `--concurrency N`, and how their stats reach the admin port.

The first process serves admin and stats; N-1 workers share the listeners with it through
SO_REUSEPORT, each with its own ADS stream and its own `Stats`. Each worker gets one end of a
socketpair (a private channel: no path, no port) and answers every line `stats` on it with
its `Stats.export()` as one JSON line, so a scrape of the first process sums the whole proxy
at that moment. A worker that died or does not answer in time is left out of the sum and
logged; the scrape is never failed by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from istio.proxy.stats import Stats

log = logging.getLogger(__name__)

STATS_FD_FLAG = "--stats-fd"
_REQUEST = b"stats\n"
# A worker's export is one line: a proxy with many clusters makes it large.
_LINE_LIMIT = 64 * 1024 * 1024


@dataclass(slots=True)
class Worker:
    process: asyncio.subprocess.Process
    channel: socket.socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    late: int = 0  # answers still owed from questions that timed out: skipped when they come
    gone: bool = False

    async def stats(self, answer_within: float) -> dict[str, Any] | None:
        if self.gone:
            return None
        async with self.lock:  # one question at a time on the channel
            try:
                if self.streams is None:
                    self.streams = await asyncio.open_connection(
                        sock=self.channel, limit=_LINE_LIMIT
                    )
                reader, writer = self.streams
                writer.write(_REQUEST)
                self.late += 1
                async with asyncio.timeout(answer_within):
                    while self.late:
                        line = await reader.readline()
                        if not line:
                            raise ConnectionError("channel closed")
                        self.late -= 1
                state: dict[str, Any] = json.loads(line)
                return state
            except TimeoutError:
                log.warning("worker %s gave no stats in %gs", self.process.pid, answer_within)
                return None
            except (OSError, ValueError, asyncio.LimitOverrunError) as error:
                log.warning("worker %s gave no stats: %s", self.process.pid, error)
                self.close()
                return None

    def close(self) -> None:
        self.gone = True
        if self.streams is not None:
            self.streams[1].close()
        else:
            self.channel.close()


async def spawn(argv: Sequence[str], count: int) -> list[Worker]:
    """Starts `count` workers running `python -m istio.proxy ARGV --worker --stats-fd N`."""
    workers = []
    for _ in range(count):
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "istio.proxy",
                *argv,
                "--worker",
                STATS_FD_FLAG,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        workers.append(Worker(process, ours))
    return workers


async def merged_stats(own: Stats, workers: Sequence[Worker], answer_within: float = 2.0) -> Stats:
    """This process's stats plus every answering worker's."""
    if not workers:
        return own
    states = await asyncio.gather(*(worker.stats(answer_within) for worker in workers))
    total = Stats()
    total.absorb(own.export())
    for state in states:
        if state is not None:
            total.absorb(state)
    return total


async def serve_stats(fd: int, stats: Stats) -> None:
    """In a worker: answer the first process's questions until it goes away."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    try:
        while line := await reader.readline():
            if line == _REQUEST:
                writer.write(json.dumps(stats.export(), separators=(",", ":")).encode() + b"\n")
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
