"""The e2e driver for the local platform: `python -m istio.platform.local up` as a child process,
exactly what `make up` runs, on its own /24 of 127/8 so it never meets a mesh a user runs."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from istio.platform.driver import (
    Response,
    SyncState,
    http,
    sync_state,
    wait_for_propagation,
)
from istio.platform.local import ports
from istio.platform.local.layout import (
    ADMIN_PORT,
    BOOKINFO,
    OUTBOUND_PORT,
    STATS_PORT,
    Layout,
    Workload,
    service_entry,
    write_atomically,
)
from istio.platform.local.mesh import (
    app_env,
    node_agent_argv,
    read_state,
    sidecar_argv,
    token_argv,
    write_private,
)

BIN = Path(sys.executable).parent
READY_MARKER = "The mesh is ready"
START_TIMEOUT = 90.0
PROXIES = len(BOOKINFO) + 1  # every sidecar and the ingress gateway
TEST_APP_FIRST_HOST = 100  # test apps take NETWORK.100 upwards
APP_START_TIMEOUT = 30.0


@dataclass
class _TestApp:
    workload: Workload
    processes: list[subprocess.Popen[bytes]]
    logs: list[IO[bytes]]


class LocalDriver:
    name = "local"

    def __init__(
        self,
        mesh_dir: Path,
        *,
        network: str = "127.0.1",
        hosts: Mapping[str, str] | None = None,
        zipkin_address: str = "",
        auth: str = "none",
    ) -> None:
        self.layout = Layout(
            mesh_dir,
            network,
            extra_hosts=dict(hosts or {}),
            zipkin_address=zipkin_address,
            auth=auth,
        )
        self.propagation: list[float] = []
        self._applied: list[Path] = []
        self._process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._apps: dict[str, _TestApp] = {}

    @property
    def ingress_url(self) -> str:
        return self.layout.ingress_url

    @property
    def pilot_address(self) -> str:
        return self.layout.pilot_http

    def command(self, verb: str) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "istio.platform.local",
            verb,
            "--mesh-dir",
            str(self.layout.mesh_dir),
            "--network",
            self.layout.network,
        ]
        for name, address in sorted(self.layout.extra_hosts.items()):
            argv += ["--host", f"{name}={address}"]
        if self.layout.zipkin_address:
            argv += ["--zipkin-address", self.layout.zipkin_address]
        if self.layout.mtls:
            argv += ["--auth", self.layout.auth]
        return argv

    def deploy_bookinfo(self) -> None:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        self._process = subprocess.Popen(
            [*prefix, *self.command("up")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.teardown()
                raise AssertionError(
                    f"mesh not ready in {START_TIMEOUT:.0f} s:\n{self.output()}"
                ) from None
            if line is None:
                raise AssertionError(f"make up exited while starting:\n{self.output()}")
            if line.startswith(READY_MARKER):
                return

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        return "".join(self._lines)

    def wait_for_output(self, text: str, timeout: float = 15.0) -> str:
        """The first reported line containing `text` (the platform's own report, not config)."""
        deadline = time.monotonic() + timeout
        for line in list(self._lines):
            if text in line:
                return line
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                break
            if text in item:
                return item
        raise AssertionError(f"no {text!r} reported in {timeout:.0f} s:\n{self.output()}")

    def istioctl(self, *args: str) -> str:
        env = dict(os.environ, ISTIO_CONFIG_STORE=self.layout.config_store_url)
        done = subprocess.run(
            [str(BIN / "istioctl"), *args], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"istioctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    @property
    def proxies(self) -> int:
        """How many proxies this mesh runs: Bookinfo's sidecars, the gateway, the test apps'."""
        return PROXIES + len(self._apps)

    def _change(self, verb: str, path: Path) -> float:
        before: SyncState = sync_state(self.pilot_address)
        self.istioctl(verb, "-f", str(path))
        seconds = wait_for_propagation(self.pilot_address, before, proxies=self.proxies)
        self.propagation.append(seconds)
        return seconds

    def apply(self, path: Path) -> float:
        seconds = self._change("create", path)
        self._applied.append(path)
        return seconds

    def delete(self, path: Path) -> float:
        seconds = self._change("delete", path)
        self._applied.remove(path)
        return seconds

    def reset(self) -> None:
        for path in reversed(list(self._applied)):
            self.delete(path)

    def request_from(self, workload: str, url: str, timeout: float = 10.0) -> Response:
        for w in self.layout.workloads:
            if w.name == workload:
                return http(url, proxy=f"http://{w.ip}:{OUTBOUND_PORT}", timeout=timeout)
        raise KeyError(workload)

    def admin(self, workload: str, path: str) -> Response:
        for w in self.layout.workloads:
            if w.name == workload:
                return http(f"http://{w.ip}:{ADMIN_PORT}{path}")
        raise KeyError(workload)

    def inbound_url(self, workload: str) -> str:
        for w in self.layout.workloads:
            if w.name == workload:
                return f"http://{w.ip}:{w.service_port}"
        raise KeyError(workload)

    def kill_workload(self, workload: str) -> None:
        state = read_state(self.layout.pid_file) or {}
        pid = state.get("children", {}).get(workload)
        if not isinstance(pid, int):
            raise AssertionError(f"no running {workload} in {self.layout.pid_file}: {state}")
        os.kill(pid, signal.SIGKILL)

    # Test apps: started by the driver itself next to the mesh `up` runs, as a user adding a
    # workload would (its ServiceEntry file in registry/, its sidecar and app as processes).

    def _app_registry_file(self, name: str) -> Path:
        return self.layout.registry_dir / f"e2e-app-{name}.yaml"

    def deploy_app(self, name: str, version: str = "v1") -> str:
        if name in self._apps or name in {app for app, _ in BOOKINFO}:
            raise ValueError(f"service {name!r} is already deployed")
        host = TEST_APP_FIRST_HOST + len(self._apps)
        w = Workload(name, version, f"{self.layout.network}.{host}")
        wanted = [
            (w.ip, w.app_port, f"{w.name} app"),
            (w.ip, w.service_port, f"{w.name} sidecar inbound"),
            (w.ip, OUTBOUND_PORT, f"{w.name} sidecar outbound"),
            (w.ip, ADMIN_PORT, f"{w.name} sidecar admin"),
            (w.ip, STATS_PORT, f"{w.name} sidecar stats"),
        ]
        busy = ports.check(wanted)
        if busy:
            raise AssertionError("cannot deploy " + "; ".join(str(b) for b in busy))
        # Into the registry first, so every proxy has the service before the new ones connect.
        before = sync_state(self.pilot_address)
        header = "# Written by the e2e driver: a test app (istio.platform.echo).\n"
        write_atomically(
            self._app_registry_file(name),
            header + yaml.safe_dump(service_entry(name, [w]), sort_keys=False),
        )
        wait_for_propagation(self.pilot_address, before, proxies=self.proxies)
        app = _TestApp(w, [], [])
        self._apps[name] = app
        app_argv = [
            sys.executable,
            "-m",
            "istio.platform.echo",
            "--name",
            name,
            "--version",
            version,
            "--host",
            w.ip,
            "--port",
            str(w.app_port),
        ]
        before = sync_state(self.pilot_address)
        self._spawn(app, w.name, app_argv, app_env(w))
        deadline = time.monotonic() + APP_START_TIMEOUT
        if self.layout.mtls:
            self._certificates(app, w, deadline)
        self._spawn(app, f"{w.name}-sidecar", sidecar_argv(self.layout, w), {})
        for url in (f"http://{w.ip}:{w.app_port}/health", f"http://{w.ip}:{ADMIN_PORT}/ready"):
            while (answer := http(url, timeout=2.0)).status != 200:
                dead = [p.args for p in app.processes if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    self.remove_app(name)
                    raise AssertionError(
                        f"{w.name} not serving at {url} ({answer.status} {answer.body[:200]}); "
                        f"exited: {dead}; logs in {self.layout.logs_dir}"
                    )
                time.sleep(0.05)  # a process we just started; nothing to wait on but its port
        wait_for_propagation(self.pilot_address, before, proxies=self.proxies)
        return f"http://{w.ip}:{w.service_port}"

    def _certificates(self, app: _TestApp, w: Workload, deadline: float) -> None:
        """A node agent for the test app's sidecar, as the platform starts one per proxy
        (a join token from `istioctl token create`); until its certificate is written."""
        made = subprocess.run(
            token_argv(self.layout, w.identity), capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            raise AssertionError(f"istioctl token create: {made.stderr}")
        cert_dir = self.layout.cert_dir(w.name)
        write_private(cert_dir.with_suffix(".join-token"), made.stdout)
        self._spawn(
            app, f"{w.name}-node-agent", node_agent_argv(self.layout, w.name, w.identity), {}
        )
        while not (cert_dir / "cert-chain.pem").exists():
            dead = [p.args for p in app.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(
                    f"no certificate for {w.name} in {cert_dir}; exited: {dead}; "
                    f"logs in {self.layout.logs_dir}"
                )
            time.sleep(0.05)  # a process we just started; nothing to wait on but its file

    def _spawn(self, app: _TestApp, name: str, argv: list[str], env: dict[str, str]) -> None:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        log = (self.layout.logs_dir / f"{name}.log").open("ab")
        app.logs.append(log)
        app.processes.append(
            subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **env),
                start_new_session=True,
            )
        )

    def remove_app(self, name: str) -> None:
        app = self._apps.get(name)
        if app is None:
            raise KeyError(name)
        path = self._app_registry_file(name)
        if path.exists() and self._process is not None and self._process.poll() is None:
            before = sync_state(self.pilot_address)
            path.unlink()
            wait_for_propagation(self.pilot_address, before, proxies=self.proxies)
        path.unlink(missing_ok=True)
        self._stop_app(app)
        del self._apps[name]

    @staticmethod
    def _stop_app(app: _TestApp) -> None:
        for process in app.processes:
            if process.poll() is None:
                process.terminate()
        for process in app.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in app.logs:
            log.close()

    def teardown(self) -> None:
        for app in self._apps.values():
            self._stop_app(app)
        self._apps.clear()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(10)
        with contextlib.suppress(OSError):
            if process.stdout is not None:
                process.stdout.close()
