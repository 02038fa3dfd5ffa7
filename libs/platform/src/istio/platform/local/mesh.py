"""The local platform's supervisor: starts Pilot, every Bookinfo workload with its sidecar and
the ingress gateway as its children, reports the ones that die, and stops them all.

Every child runs in its own session (Ctrl-C reaches the supervisor alone, which then stops the
children in order) and gets SIGTERM if the supervisor dies (PR_SET_PDEATHSIG, via `setpriv
--pdeathsig` or prctl), so nothing outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from istio.config import parse_documents
from istio.configstore import open_store
from istio.platform.local import ports
from istio.platform.local.layout import (
    ADMIN_PORT,
    OUTBOUND_PORT,
    STATS_PORT,
    Layout,
    Workload,
    ingress_rules,
    write_atomically,
    write_hosts,
    write_registry,
)

BIN = Path(sys.executable).parent
DEFAULT_MESH_DIR = Path(".mesh")
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DRAIN_SECONDS = "1"


class StartError(Exception):
    """The mesh could not start; the message says why and what to do."""


@dataclass
class Child:
    name: str
    role: str  # "pilot", "app", "sidecar", "ingress"
    argv: list[str]
    log: Path
    workload: Workload | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text)


class LocalMesh:
    """One mesh under `layout.mesh_dir`. `start()` then `run_until(stop)`, or `async with`."""

    def __init__(self, layout: Layout, out: Callable[[str], None] | None = None) -> None:
        self.layout = layout
        self.children: list[Child] = []
        self.dead: set[str] = set()
        self._say = out or (lambda text: print(text, flush=True))
        self._setpriv = shutil.which("setpriv")
        self._logs: list[IO[bytes]] = []

    # Setup.

    def prepare(self) -> None:
        layout = self.layout
        for directory in (layout.config_dir, layout.registry_dir, layout.logs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._check_not_running()
        busy = ports.check(layout.listen_addresses())
        if busy:
            by_holder: dict[str, list[ports.Busy]] = {}
            for item in busy:
                by_holder.setdefault(item.holder or "", []).append(item)
            lines = []
            for holder, items in by_holder.items():
                taken = ", ".join(f"{b.ip}:{b.port} ({b.what})" for b in items)
                reason = items[0].reason
                who = f"by {_short(holder)}" if holder else ""
                lines.append(f"  {taken}: {reason} {who}".rstrip())
            raise StartError(
                f"cannot start: {len(busy)} address(es) the mesh needs are taken:\n"
                + "\n".join(lines)
                + "\nStop those processes (or `make down` if it is another mesh), then try again."
            )
        write_registry(layout, layout.workloads)
        write_hosts(layout)
        write_atomically(layout.mesh_config_file, yaml.safe_dump(layout.mesh_config()))

    def _check_not_running(self) -> None:
        state = read_state(self.layout.pid_file)
        pid = state.get("supervisor") if state else None
        if isinstance(pid, int) and is_supervisor(pid):
            raise StartError(
                f"a mesh is already running from {self.layout.mesh_dir} (pid {pid}): "
                "`make down` stops it"
            )

    async def write_ingress_rules(self) -> None:
        """0.2's Bookinfo Ingress into the store, unless the user already has them."""
        documents = ingress_rules()
        for document in documents:
            document["spec"]["port"] = self.layout.ingress_port
        configs, problems = parse_documents(yaml.safe_dump_all(documents), "<bookinfo ingress>")
        if problems:
            raise StartError("\n".join(str(p) for p in problems))
        store = open_store(self.layout.config_store_url)
        try:
            for config in configs:
                meta = config.meta
                if await store.get(meta.kind, meta.name, meta.namespace) is None:
                    await store.create(config)
        finally:
            await store.close()

    # Processes.

    def _children(self) -> list[Child]:
        layout, logs = self.layout, self.layout.logs_dir
        pilot = Child(
            "pilot",
            "pilot",
            [
                str(BIN / "pilot-discovery"),
                "--registry",
                f"file:{layout.registry_dir.resolve()}",
                "--config-store",
                layout.config_store_url,
                "--grpc-addr",
                layout.pilot_grpc,
                "--http-addr",
                layout.pilot_http,
                "--mesh-config",
                str(layout.mesh_config_file.resolve()),
            ],
            logs / "pilot.log",
        )
        children = [pilot]
        for w in layout.workloads:
            env = app_env(w)
            children.append(
                Child(
                    w.name,
                    "app",
                    [
                        sys.executable,
                        "-m",
                        "istio.bookinfo",
                        w.app,
                        "--version",
                        w.version,
                        "--host",
                        w.ip,
                        "--port",
                        str(w.app_port),
                    ],
                    logs / f"{w.name}.log",
                    w,
                    env,
                )
            )
            children.append(
                Child(
                    f"{w.name}-sidecar",
                    "sidecar",
                    sidecar_argv(layout, w),
                    logs / f"{w.name}-sidecar.log",
                    w,
                )
            )
        children.append(
            Child(
                "ingress",
                "ingress",
                self._agent(
                    "ingress",
                    layout.ingress_ip,
                    layout.ingress_node_id,
                    "ingress",
                    "--service-cluster",
                    "istio-ingress",
                ),
                logs / "ingress.log",
            )
        )
        return children

    def _agent(self, kind: str, ip: str, node_id: str, name: str, *extra: str) -> list[str]:
        return agent_argv(self.layout, kind, ip, node_id, name, *extra)

    async def _spawn(self, child: Child) -> None:
        log = child.log.open("ab")
        self._logs.append(log)
        log.write(f"--- {time.strftime('%F %T')} {' '.join(child.argv)}\n".encode())
        log.flush()
        env = dict(os.environ, **child.env)
        if self._setpriv:
            argv = [self._setpriv, "--pdeathsig", "TERM", "--", *child.argv]
            preexec: Callable[[], None] | None = None
        else:
            argv, preexec = child.argv, _die_with_parent
        child.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.children.append(child)
        self._write_state(ready=False)

    async def _wait_http(
        self, session: aiohttp.ClientSession, url: str, child: Child, deadline: float
    ) -> None:
        """Until `url` answers 200 (a readiness check of a process we started), or it dies."""
        last = "no answer"
        while time.monotonic() < deadline:
            if not child.running:
                code = child.process.returncode if child.process else None
                raise StartError(
                    f"{child.name} exited with status {code} while starting "
                    f"(log: {child.log}):\n{log_tail(child.log)}"
                )
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                last = type(error).__name__
            await asyncio.sleep(0.05)
        raise StartError(
            f"{child.name} not ready at {url} after {START_TIMEOUT:.0f} s ({last}); "
            f"log: {child.log}\n{log_tail(child.log)}"
        )

    async def start(self) -> float:
        """Everything up and the product page answering 200; the seconds it took."""
        began = time.monotonic()
        self.prepare()
        await self.write_ingress_rules()
        deadline = began + START_TIMEOUT
        children = self._children()
        pilot, workloads, ingress = children[0], children[1:-1], children[-1]
        async with aiohttp.ClientSession() as session:
            await self._spawn(pilot)
            await self._wait_http(
                session, f"http://{self.layout.pilot_http}/ready", pilot, deadline
            )
            for child in workloads:
                await self._spawn(child)
            await self._spawn(ingress)
            checks = []
            for child in workloads:
                w = child.workload
                assert w is not None
                url = (
                    f"http://{w.ip}:{w.app_port}/health"
                    if child.role == "app"
                    else f"http://{w.ip}:{ADMIN_PORT}/ready"
                )
                checks.append(self._wait_http(session, url, child, deadline))
            ingress_ip = self.layout.ingress_ip
            checks.append(
                self._wait_http(
                    session, f"http://{ingress_ip}:{ADMIN_PORT}/ready", ingress, deadline
                )
            )
            await asyncio.gather(*checks)
            await self._wait_http(
                session, f"{self.layout.ingress_url}/productpage", children[1], deadline
            )
        self._write_state(ready=True)
        return time.monotonic() - began

    async def run_until(self, stop: asyncio.Event) -> None:
        """Supervise: report a child that exits; a dead workload leaves the registry."""
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children if c.process}
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while waits:
                done, _ = await asyncio.wait(
                    {*waits, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return
                for task in done:
                    self._died(waits.pop(task))
        finally:
            stopping.cancel()
            for task in waits:
                task.cancel()

    def _died(self, child: Child) -> None:
        code = child.process.returncode if child.process else None
        self.dead.add(child.name)
        message = f"{child.name} (pid {child.pid}) exited with status {code}"
        if child.workload is not None:
            alive = [
                w
                for w in self.layout.workloads
                if w.name not in self.dead and f"{w.name}-sidecar" not in self.dead
            ]
            write_registry(self.layout, alive)
            w = child.workload
            message += f"; {w.ip}:{w.service_port} left the {w.app} service's endpoints"
        elif child.role == "pilot":
            message += "; proxies keep their last config"
        self._say(f"mesh: {message} (log: {child.log})\n{log_tail(child.log, 5)}")
        self._write_state(ready=True)

    async def stop(self) -> None:
        """Gateways, sidecars and apps first, then Pilot; SIGKILL after STOP_TIMEOUT."""
        pilot = [c for c in self.children if c.role == "pilot"]
        rest = [c for c in self.children if c.role != "pilot"]
        for group in (rest, pilot):
            await asyncio.gather(*(self._stop_one(c) for c in group))
        for log in self._logs:
            log.close()
        self._logs.clear()
        state = read_state(self.layout.pid_file)
        if state is not None and state.get("supervisor") == os.getpid():
            self.layout.pid_file.unlink()

    async def _stop_one(self, child: Child) -> None:
        process = child.process
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

    def _write_state(self, *, ready: bool) -> None:
        layout = self.layout
        state = {
            "supervisor": os.getpid(),
            "ready": ready,
            "network": layout.network,
            "pilot": layout.pilot_http,
            "ingress": layout.ingress_url,
            "children": {c.name: c.pid for c in self.children if c.running},
        }
        layout.mesh_dir.mkdir(parents=True, exist_ok=True)
        tmp = layout.pid_file.with_name(".pids.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, layout.pid_file)

    # What `make up` prints.

    def summary(self, seconds: float, istioctl_env: str = "") -> str:
        layout = self.layout
        rows = [
            f"  {'workload':<16}{'app':<20}{'sidecar (inbound, outbound, admin)':<38}pids",
        ]
        by_name = {c.name: c for c in self.children}
        for w in layout.workloads:
            app, sidecar = by_name.get(w.name), by_name.get(f"{w.name}-sidecar")
            rows.append(
                f"  {w.name:<16}{f'{w.ip}:{w.app_port}':<20}"
                f"{f'{w.ip}:{w.service_port}, :{OUTBOUND_PORT}, :{ADMIN_PORT}':<38}"
                f"{app.pid if app else '-'}, {sidecar.pid if sidecar else '-'}"
            )
        down_command = "make down" + (
            "" if layout.mesh_dir == DEFAULT_MESH_DIR else f" MESH_DIR={layout.mesh_dir}"
        )
        here = Path.cwd()
        ctl = f"{istioctl_env}{BIN.relative_to(here) if BIN.is_relative_to(here) else BIN}/istioctl"
        pilot_flag = (
            ""
            if layout.pilot_http == "127.0.0.1:15014"
            else f" --pilot-address {layout.pilot_http}"
        )
        pilot_pid = by_name["pilot"].pid if "pilot" in by_name else "-"
        ingress_pid = by_name["ingress"].pid if "ingress" in by_name else "-"
        return "\n".join(
            [
                "",
                f"The mesh is ready ({seconds:.1f} s). State in {layout.mesh_dir}/",
                "",
                f"  Bookinfo:  {layout.ingress_url}/productpage",
                f"  Pilot:     xDS {layout.pilot_grpc}, debug http://{layout.pilot_http}/debug/syncz"
                f" (pid {pilot_pid})",
                f"  Ingress:   {layout.ingress_url} (admin http://{layout.ingress_ip}:{ADMIN_PORT},"
                f" pid {ingress_pid})",
                *rows,
                f"  Config:    {layout.config_dir}/ (istioctl's default store)",
                f"  Registry:  {layout.registry_dir}/    Hosts file: {layout.hosts_file}",
                f"  Logs:      {layout.logs_dir}/",
                "",
                "Try:",
                f"  curl {layout.ingress_url}/productpage",
                f"  {ctl} proxy-status{pilot_flag}",
                f"  {ctl} create -f samples/bookinfo/route-rule-all-v1.yaml",
                f"  {ctl} create -f samples/bookinfo/route-rule-reviews-test-v2.yaml",
                f"  {ctl} get route-rules",
                f"  {ctl} delete -f samples/bookinfo/route-rule-reviews-test-v2.yaml",
                "",
                f"Ctrl-C here, or `{down_command}` from another shell, stops everything.",
            ]
        )


def agent_argv(
    layout: Layout, kind: str, ip: str, node_id: str, name: str, *extra: str
) -> list[str]:
    """`pilot-agent proxy KIND` bound to `ip`, logging to $MESH_DIR/logs/NAME-access.log."""
    return [
        str(BIN / "pilot-agent"),
        "proxy",
        kind,
        "--discovery-address",
        layout.pilot_grpc,
        "--bind-address",
        ip,
        "--node-id",
        node_id,
        "--admin-port",
        str(ADMIN_PORT),
        "--stats-port",
        str(STATS_PORT),
        "--hosts-file",
        str(layout.hosts_file.resolve()),
        "--access-log",
        str((layout.logs_dir / f"{name}-access.log").resolve()),
        "--drain-seconds",
        DRAIN_SECONDS,
        *extra,
    ]


def sidecar_argv(layout: Layout, w: Workload) -> list[str]:
    """A workload's sidecar: no iptables, inbound on its service port to the app's port."""
    return agent_argv(
        layout,
        "sidecar",
        w.ip,
        w.node_id,
        f"{w.name}-sidecar",
        "--meta",
        "INTERCEPTION_MODE=NONE",
        "--meta",
        f"APP_PORTS={w.service_port}:{w.app_port}",
        "--meta",
        f"APP_HOST={w.ip}",
        "--service-cluster",
        w.app,
    )


def app_env(w: Workload) -> dict[str, str]:
    """An app reaches everything through its sidecar (HTTP_PROXY), NO_PROXY cleared."""
    return {
        "HTTP_PROXY": w.proxy_url,
        "http_proxy": w.proxy_url,
        "NO_PROXY": "",
        "no_proxy": "",
        "PYTHONUNBUFFERED": "1",
    }


def _short(holder: str, width: int = 120) -> str:
    return holder if len(holder) <= width else holder[: width - 4] + " ...)"


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_supervisor(pid: int) -> bool:
    return "istio.platform.local" in ports.command_line(pid) and pid != os.getpid()


async def up(layout: Layout, say: Callable[[str], None] | None = None) -> int:
    """`make up`: start, print the summary, supervise until SIGINT/SIGTERM, stop."""
    say = say or (lambda text: print(text, flush=True))
    mesh = LocalMesh(layout, say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    say(f"mesh: starting Pilot, Bookinfo and the ingress gateway in {layout.mesh_dir}/ ...")
    try:
        starting = asyncio.ensure_future(mesh.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError):
                await starting
            say("mesh: interrupted while starting")
            return 130
        stopping.cancel()
        seconds = starting.result()
        env = "" if layout.mesh_dir == DEFAULT_MESH_DIR else f"MESH_DIR={layout.mesh_dir} "
        say(mesh.summary(seconds, env))
        await mesh.run_until(stop)
        say("\nmesh: stopping ...")
        return 0
    except StartError as error:
        say(f"mesh: {error}")
        return 1
    finally:
        started = bool(mesh.children)
        await mesh.stop()
        if started:
            say("mesh: stopped")


def down(layout: Layout, say: Callable[[str], None] | None = None) -> int:
    """`make down`: SIGTERM the supervisor named in the pid file and wait for it to finish."""
    say = say or print
    state = read_state(layout.pid_file)
    pid = state.get("supervisor") if state else None
    if not isinstance(pid, int) or not is_supervisor(pid):
        say(f"mesh: none running from {layout.mesh_dir}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT * 2 + 5
    while time.monotonic() < deadline:
        if not is_supervisor(pid):
            say(f"mesh: stopped (supervisor pid {pid})")
            return 0
        time.sleep(0.05)  # waiting for another process to exit: there is nothing to wait on
    say(f"mesh: supervisor pid {pid} still running after SIGTERM")
    return 1


def parse_hosts(values: Sequence[str]) -> dict[str, str]:
    hosts = {}
    for value in values:
        name, equals, address = value.partition("=")
        if not equals or not name or not address:
            raise ValueError(f"expected NAME=ADDRESS, got {value!r}")
        hosts[name] = address
    return hosts
