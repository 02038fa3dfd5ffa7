"""A real etcd v3 server on loopback for tests: `async with EtcdServer(tmp_path) as etcd:`.

Runs Debian's etcd-server binary as a single-member cluster on free 127.0.0.1 ports, waits
until its /health endpoint answers, and stops it on exit. etcd cannot bind port 0, so ports are
picked by binding and releasing them, and startup is retried when another process takes one
in between. The child gets SIGTERM if this process dies (setpriv --pdeathsig), so even a killed
test run leaves no etcd behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType

import aiohttp

ETCD_BINARY = "/usr/bin/etcd"
HOST = "127.0.0.1"
PORT_ATTEMPTS = 5
HEALTH_ATTEMPTS = 400  # at least 20 s: a first start fsyncs a new data dir
HEALTH_INTERVAL = 0.05
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 20


class EtcdServerError(RuntimeError):
    """etcd could not be started; the message carries the tail of its log."""


class EtcdServer:
    """One etcd member listening on 127.0.0.1, with its data and log under `data_dir`."""

    def __init__(self, data_dir: Path, *, binary: str = ETCD_BINARY) -> None:
        self.data_dir = data_dir
        self.binary = binary
        self.host = HOST
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The client URL, e.g. http://127.0.0.1:40123."""
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    async def __aenter__(self) -> EtcdServer:
        self._prepare()
        try:
            for _ in range(PORT_ATTEMPTS):
                if await self._start():
                    return self
            raise EtcdServerError(
                f"etcd found no free ports in {PORT_ATTEMPTS} attempts:\n{self._log_tail()}"
            )
        except BaseException:
            await self._stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop()

    def _prepare(self) -> None:
        if shutil.which(self.binary) is None:
            raise EtcdServerError(
                f"{self.binary} not found: etcd tests need Debian's etcd-server; run `make setup`"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)

    async def _start(self) -> bool:
        """Start etcd on fresh ports; False when a port was taken meanwhile (try again)."""
        self.port, peer_port = _free_ports(2)
        peer_url = f"http://{self.host}:{peer_port}"
        member_dir = self.data_dir / "member-data"
        shutil.rmtree(member_dir, ignore_errors=True)
        command = [
            self.binary,
            "--name=test",
            f"--data-dir={member_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--logger=zap",
            "--log-level=warn",
        ]
        pdeathsig = shutil.which("setpriv")
        if pdeathsig is not None:
            command = [pdeathsig, "--pdeathsig=TERM", "--", *command]
        # etcd refuses to start when an ETCD_* variable shadows a flag it was given.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        if await self._wait_healthy(self._process):
            return True
        log_tail = self._log_tail()
        await self._stop()
        if "address already in use" in log_tail:
            return False
        raise EtcdServerError(f"etcd did not become healthy at {self.url}:\n{log_tail}")

    async def _wait_healthy(self, process: asyncio.subprocess.Process) -> bool:
        """Poll /health until it says true; False if etcd exits or never gets there."""
        exited = asyncio.ensure_future(process.wait())
        timeout = aiohttp.ClientTimeout(total=1)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for _ in range(HEALTH_ATTEMPTS):
                    if await _healthy(session, f"{self.url}/health"):
                        return True
                    # Wakes early when etcd exits: no point polling a dead process.
                    await asyncio.wait([exited], timeout=HEALTH_INTERVAL)
                    if exited.done():
                        return False
            return False
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exited

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no etcd log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return False
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def _free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (all held at once, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
