"""The local platform's supervisor: starts Pilot, every Bookinfo workload with its sidecar and
the ingress gateway as its children, reports the ones that die, and stops them all. With mutual
TLS (`--auth mtls|permissive`) it first starts istio-ca and, for every proxy, a node agent that
gets the proxy's certificate with a one-time join token and keeps it fresh in the directory the
proxy reads (--cert-dir).

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
    CA_BOOTSTRAP_PORT,
    MIXER_MONITORING_PORT,
    MIXER_PROMETHEUS_PORT,
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
# 0.2's default Mixer telemetry (install/mixer in the repository this platform runs from).
MIXER_DEFAULTS = Path(__file__).resolve().parents[6] / "install" / "mixer"
DEFAULT_MESH_DIR = Path(".mesh")
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DRAIN_SECONDS = "1"
JOIN_TOKEN_TTL = "10m"  # a node agent spends its token within seconds of starting


class StartError(Exception):
    """The mesh could not start; the message says why and what to do."""


@dataclass
class Child:
    name: str
    role: str  # "pilot", "ca", "node-agent", "app", "sidecar", "ingress"
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
        if layout.mtls:
            (layout.mesh_dir / "certs").mkdir(mode=0o700, exist_ok=True)
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

    async def write_mixer_defaults(self) -> None:
        """0.2's default telemetry (metrics and access log) and its attribute producer (the
        `kubernetes` handler, here reading the registry this platform writes) into the store,
        unless the user already has objects of those names."""
        if not MIXER_DEFAULTS.is_dir():
            raise StartError(f"{MIXER_DEFAULTS}: missing; the local platform runs from a checkout")
        sources = [(path.read_text(), str(path)) for path in sorted(MIXER_DEFAULTS.glob("*.yaml"))]
        sources.append((mixer_producer(self.layout), "the local platform's kubernetes handler"))
        configs = []
        for text, source in sources:
            found, problems = parse_documents(text, source)
            if problems:
                raise StartError("\n".join(str(p) for p in problems))
            configs += found
        store = open_store(self.layout.config_store_url)
        try:
            for config in configs:
                meta = config.meta
                if await store.get(meta.kind, meta.name, meta.namespace) is None:
                    await store.create(config)
        finally:
            await store.close()

    def _mixer(self) -> Child:
        layout = self.layout
        return Child(
            "mixer",
            "mixer",
            [
                str(BIN / "mixs"),
                "server",
                "--config-store",
                layout.config_store_url,
                "--grpc-addr",
                layout.mixer_address,
                "--monitoring-addr",
                f"{layout.mixer_ip}:{MIXER_MONITORING_PORT}",
                "--prometheus-addr",
                f"{layout.mixer_ip}:{MIXER_PROMETHEUS_PORT}",
            ],
            layout.logs_dir / "mixer.log",
        )

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

    def _identity_children(self) -> tuple[Child, list[tuple[Child, str]]]:
        """istio-ca, and a node agent for every proxy with the identity it gets."""
        layout, logs = self.layout, self.layout.logs_dir
        ca = Child("istio-ca", "ca", ca_argv(layout), logs / "istio-ca.log")
        proxies: list[tuple[str, str, Workload | None]] = [
            (w.name, w.identity, w) for w in layout.workloads
        ]
        proxies.append(("ingress", layout.ingress_identity, None))
        agents = [
            (
                Child(
                    f"{name}-node-agent",
                    "node-agent",
                    node_agent_argv(layout, name, identity),
                    logs / f"{name}-node-agent.log",
                    workload,
                ),
                identity,
            )
            for name, identity, workload in proxies
        ]
        return ca, agents

    async def _start_identity(self, deadline: float) -> None:
        """The CA, a join token per proxy, then the node agents; until every proxy's
        certificate files are there."""
        layout = self.layout
        ca, agents = self._identity_children()
        await self._spawn(ca)
        await self._wait_port(layout.ca_ip, CA_BOOTSTRAP_PORT, ca, deadline)
        tokens = await asyncio.gather(
            *(join_token(layout, identity) for _, identity in agents), return_exceptions=True
        )
        for (agent, _), token in zip(agents, tokens, strict=True):
            if isinstance(token, BaseException):
                raise StartError(f"cannot make a join token for {agent.name}: {token}")
            name = agent.name.removesuffix("-node-agent")
            write_private(layout.cert_dir(name).with_suffix(".join-token"), token + "\n")
        for agent, _ in agents:
            await self._spawn(agent)
        await asyncio.gather(
            *(
                self._wait_file(
                    layout.cert_dir(agent.name.removesuffix("-node-agent")) / "cert-chain.pem",
                    agent,
                    deadline,
                )
                for agent, _ in agents
            )
        )

    def _check_alive(self, child: Child) -> None:
        if not child.running:
            code = child.process.returncode if child.process else None
            raise StartError(
                f"{child.name} exited with status {code} while starting "
                f"(log: {child.log}):\n{log_tail(child.log)}"
            )

    async def _wait_port(self, ip: str, port: int, child: Child, deadline: float) -> None:
        """Until `ip:port` takes connections (a process we started binds it), or it dies."""
        while time.monotonic() < deadline:
            self._check_alive(child)
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(ip, port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise StartError(f"{child.name} not listening on {ip}:{port} after {START_TIMEOUT:.0f} s")

    async def _wait_file(self, path: Path, child: Child, deadline: float) -> None:
        """Until a process we started has written `path`, or it dies."""
        while time.monotonic() < deadline:
            self._check_alive(child)
            if await asyncio.to_thread(path.exists):
                return
            await asyncio.sleep(0.05)
        raise StartError(
            f"{child.name} wrote no {path} after {START_TIMEOUT:.0f} s "
            f"(log: {child.log}):\n{log_tail(child.log)}"
        )

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
            self._check_alive(child)
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
        await self.write_mixer_defaults()
        deadline = began + START_TIMEOUT
        children = self._children()
        pilot, workloads, ingress = children[0], children[1:-1], children[-1]
        if self.layout.mtls:
            await self._start_identity(deadline)
        async with aiohttp.ClientSession() as session:
            mixer = self._mixer()
            await self._spawn(mixer)
            await self._wait_http(
                session,
                f"http://{self.layout.mixer_ip}:{MIXER_MONITORING_PORT}/healthz",
                mixer,
                deadline,
            )
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
        if child.role == "node-agent":
            message += "; its proxy's certificate is no longer renewed"
        elif child.workload is not None:
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
        elif child.role == "ca":
            message += "; certificates are not renewed until it is back"
        self._say(f"mesh: {message} (log: {child.log})\n{log_tail(child.log, 5)}")
        self._write_state(ready=True)

    async def stop(self) -> None:
        """Gateways, sidecars and apps first, then node agents, then Pilot and the CA;
        SIGKILL after STOP_TIMEOUT."""
        control = [c for c in self.children if c.role in ("pilot", "ca")]
        agents = [c for c in self.children if c.role == "node-agent"]
        rest = [c for c in self.children if c.role not in ("pilot", "ca", "node-agent")]
        for group in (rest, agents, control):
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
            "auth": layout.auth,
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
        auth = {
            "none": "plaintext between proxies (make up AUTH=mtls or AUTH=permissive for mTLS)",
            "mtls": "mutual TLS only: plaintext to a sidecar's port is refused",
            "permissive": "mutual TLS between sidecars, plaintext accepted too",
        }[layout.auth]
        identity = (
            [
                f"  CA:        istio-ca on {layout.ca_grpc} (pid "
                f"{by_name['istio-ca'].pid if 'istio-ca' in by_name else '-'}), root "
                f"{layout.root_cert}; certificates in {layout.mesh_dir}/certs/<workload>/",
            ]
            if layout.mtls
            else []
        )
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
                f"  Mixer:     {layout.mixer_address}, request metrics {layout.mixer_metrics_url}",
                f"  Auth:      {auth}",
                *identity,
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


def mixer_producer(layout: Layout) -> str:
    """The `kubernetes` handler (0.2's attribute producer) over the ServiceEntry files of
    `layout`'s registry: Mixer fills source/destination labels, service, namespace and service
    account from source.ip and destination.ip (each workload calls from its own address)."""
    document = {
        "apiVersion": "config.istio.io/v1alpha2",
        "kind": "kubernetes",
        "metadata": {"name": "handler", "namespace": "istio-system"},
        "spec": {"registry": f"file:{layout.registry_dir.resolve()}"},
    }
    return yaml.safe_dump(document, sort_keys=False)


def agent_argv(
    layout: Layout, kind: str, ip: str, node_id: str, name: str, *extra: str
) -> list[str]:
    """`pilot-agent proxy KIND` bound to `ip` (its upstream connections leave from there too,
    as from a pod's address: peers and Mixer see which workload calls), logging to
    $MESH_DIR/logs/NAME-access.log; with mTLS, reading the certificates the node agent keeps
    in $MESH_DIR/certs/<NAME less -sidecar>."""
    certs = (
        ["--cert-dir", str(layout.cert_dir(name.removesuffix("-sidecar")).resolve())]
        if layout.mtls
        else []
    )
    return [
        str(BIN / "pilot-agent"),
        "proxy",
        kind,
        "--discovery-address",
        layout.pilot_grpc,
        "--bind-address",
        ip,
        "--source-address",
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
        *certs,
        *extra,
    ]


def ca_argv(layout: Layout) -> list[str]:
    """istio-ca with its root in $MESH_DIR/ca (made at the first start, kept after)."""
    return [
        str(BIN / "istio-ca"),
        "--ca-dir",
        str(layout.ca_dir.resolve()),
        "--grpc-addr",
        layout.ca_grpc,
        "--bootstrap-addr",
        layout.ca_bootstrap,
        "--audit-log",
        str((layout.logs_dir / "istio-ca-audit.log").resolve()),
    ]


def node_agent_argv(layout: Layout, name: str, identity: str) -> list[str]:
    """The node agent of proxy `name`: its first certificate with the join token in
    $MESH_DIR/certs/NAME.join-token, renewals with its certificate, files in certs/NAME."""
    cert_dir = layout.cert_dir(name).resolve()
    return [
        str(BIN / "node-agent"),
        "--ca-address",
        layout.ca_grpc,
        "--ca-bootstrap-address",
        layout.ca_bootstrap,
        "--identity",
        identity,
        "--join-token-file",
        str(cert_dir.with_suffix(".join-token")),
        "--out-dir",
        str(cert_dir),
        "--root-cert",
        str(layout.root_cert.resolve()),
    ]


def token_argv(layout: Layout, identity: str) -> list[str]:
    return [
        str(BIN / "istioctl"),
        "token",
        "create",
        "--ca-dir",
        str(layout.ca_dir.resolve()),
        "--identity",
        identity,
        "--ttl",
        JOIN_TOKEN_TTL,
    ]


async def join_token(layout: Layout, identity: str) -> str:
    """A one-time join token for `identity` (`istioctl token create`)."""
    process = await asyncio.create_subprocess_exec(
        *token_argv(layout, identity),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise StartError(f"istioctl token create: {err.decode(errors='replace').strip()}")
    return out.decode().strip()


def write_private(path: Path, text: str) -> None:
    """A file only its owner reads (a join token), replaced whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temporary, path)


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
    ca = "istio-ca with a node agent per proxy, " if layout.mtls else ""
    say(f"mesh: starting {ca}Pilot, Bookinfo and the ingress gateway in {layout.mesh_dir}/ ...")
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
