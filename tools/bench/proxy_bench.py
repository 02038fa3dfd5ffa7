"""The sidecar's HTTP/1.1 data plane against a native proxy, with wrk, on loopback.

    .venv/bin/python tools/bench/proxy_bench.py [--duration 10] [--connections 50]
        [--threads 1] [--services 100] [--soak 60] [--full-soak] [--access-log PATH]
        [--markdown build/bench/proxy_bench.md]

Needs `wrk` and `haproxy` on PATH (Debian: `apt-get install -y wrk haproxy`); installs nothing.
Everything runs in this one invocation, on loopback addresses 127.0.0.201-204 (so the ratios
come from the same machine state):

  backend   haproxy (nbthread 1) answering every request itself with a fixed 200 "ok"
            (`http-request return`), on 127.0.0.201:8080: the cheapest native HTTP server
            here, so the proxy under test is the bottleneck;
  direct    wrk -> backend;
  haproxy   wrk -> haproxy (nbthread 1, HTTP/1.1 keep-alive to the backend, `http-reuse
            always`) on 127.0.0.202 -> backend;
  sidecar   wrk -> `pilot-agent proxy sidecar` (INTERCEPTION_MODE=NONE) on 127.0.0.203:15001
            with `Host: bench:9080`: routed by authority to the default route (no RouteRule) of
            service `bench`, whose only endpoint is the backend (a ServiceEntry file read by a
            real `pilot-discovery`, with `--services` services configured in all); stats on,
            access log off unless --access-log;
  2 sidecars wrk -> client sidecar 15001 (`Host: bench-server:9080`) -> the server sidecar's
            inbound listener 127.0.0.204:9080 (APP_HOST/APP_PORTS point at the backend) ->
            backend.

Each path gets a short warm-up, then one `wrk --latency` run of --duration seconds at
--connections connections (latency under saturation), then one at a single connection (the
latency each hop adds when nothing queues). The sidecar's VmRSS is read from /proc: idle once
configured with --services services, its peak (VmHWM) after the load runs, and every few seconds
through a soak of --soak seconds (--full-soak: 600 s) to show it flat. CPU time of each proxy
process over each run is reported as a share of one core. --idle-only stops after the idle RSS
(a few seconds, no wrk run).

Ratios against the targets of issue 4 (Performance): sidecar req/s >= 1.0x haproxy's with an
added p99 (over direct) no worse than haproxy's; two sidecars >= 0.5x direct; RSS idle < 30 MB,
under load < 50 MB. The report is a markdown section ("## Proxy (HTTP/1.1)") printed to stdout
(and written to --markdown when given). Every wrk run is bounded by -d and every wait by a
timeout; all processes started here are stopped at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

BACKEND_IP, HAPROXY_IP, CLIENT_IP, SERVER_IP = (
    "127.0.0.201",
    "127.0.0.202",
    "127.0.0.203",
    "127.0.0.204",
)
FILLER_IP = "127.0.0.205"  # endpoints of the services no request goes to
BACKEND_PORT, HAPROXY_PORT, SERVICE_PORT = 8080, 8081, 9080
OUTBOUND = 15001
TARGETS = {"sidecar_vs_haproxy": 1.0, "two_vs_direct": 0.5, "idle_mb": 30.0, "load_mb": 50.0}

HAPROXY_GLOBAL = """\
global
  nbthread 1
  maxconn 4000
  tune.maxaccept 64
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
"""

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {address}, ports: {{http: {target}}}, labels: {{app: {name}, version: v1}}}}
"""


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log.read_text(errors="replace"):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-2000:]
        state = "exited" if self.popen.poll() is not None else "timed out"
        raise BenchError(f"{self.name} {state} before {marker!r}; its log ends:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            with contextlib.suppress(Exception):
                proc.stop()


def wait_port(proc: Proc, host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.popen.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    tail = proc.log.read_text(errors="replace")[-2000:]
    raise BenchError(f"{proc.name}: nothing listens on {host}:{port}; its log ends:\n{tail}")


def check_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host, port))
        except OSError as error:
            raise BenchError(
                f"{host}:{port} is taken ({error.strerror}); is a bench running?"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int, key: str) -> float:
    """A VmRSS/VmHWM-style field of /proc/<pid>/status, in MB (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {key} for pid {pid}")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # "" or a short description of socket errors / non-2xx
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> share of one core
    machine: float = 0.0  # cores busy, all processes (wrk, the kernel's loopback work, ...)
    rss_mb: dict[str, float] = field(default_factory=dict)  # process name -> max sampled VmRSS


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, out, re.M)
        if match is None:
            raise BenchError(f"wrk output lacks {pattern!r}:\n{out}")
        return match

    errors = []
    if match := re.search(r"Socket errors: (.*)$", out, re.M):
        errors.append("socket errors " + match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"{match.group(1)} non-2xx")
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=to_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=to_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(find(r"^\s+(\d+) requests in").group(1)),
        errors="; ".join(errors),
    )


def median_run(results: list[WrkResult]) -> WrkResult:
    """Each figure's median over the rounds (the lower middle one of an even count)."""

    def med(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2]

    return WrkResult(
        rps=med([r.rps for r in results]),
        p50_ms=med([r.p50_ms for r in results]),
        p99_ms=med([r.p99_ms for r in results]),
        requests=sum(r.requests for r in results),
        errors="; ".join(r.errors for r in results if r.errors),
        cpu={k: med([r.cpu[k] for r in results]) for k in results[0].cpu},
        machine=med([r.machine for r in results]),
    )


def background_busy(seconds: float = 2.0) -> float:
    """Cores busy with other work while this benchmark is idle (the machine is shared)."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def wrk(
    url: str,
    duration: float,
    connections: int,
    threads: int,
    host: str | None = None,
    watch: dict[str, int] | None = None,
) -> WrkResult:
    """One bounded wrk run; CPU share and max VmRSS of the `watch` processes over it."""
    watch = watch or {}
    argv = [
        "wrk",
        "--latency",
        "-t",
        str(min(threads, connections)),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "5s",
    ]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(url)
    cpu0 = {name: cpu_seconds(pid) for name, pid in watch.items()}
    busy0, total0 = machine_busy()
    rss = {name: proc_status(pid, "VmRSS") for name, pid in watch.items()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for name, pid in watch.items():
                with contextlib.suppress(OSError):
                    rss[name] = max(rss[name], proc_status(pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    result.cpu = {n: (cpu_seconds(p) - cpu0[n]) / elapsed for n, p in watch.items()}
    busy1, total1 = machine_busy()
    result.machine = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
    result.rss_mb = rss
    return result


# ---------------------------------------------------------------------------------------------
# The setup


def haproxy_backend_config() -> str:
    return (
        HAPROXY_GLOBAL
        + f"""
frontend backend
  bind {BACKEND_IP}:{BACKEND_PORT}
  http-request return status 200 content-type text/plain string ok
"""
    )


def haproxy_proxy_config() -> str:
    return (
        HAPROXY_GLOBAL
        + f"""
frontend proxy
  bind {HAPROXY_IP}:{HAPROXY_PORT}
  default_backend app
backend app
  http-reuse always
  server app {BACKEND_IP}:{BACKEND_PORT} maxconn 1000
"""
    )


def write_registry(directory: Path, services: int) -> None:
    """`bench` (the backend), `bench-server` (the server sidecar), and fillers up to `services`."""
    directory.mkdir(parents=True)
    entries = {
        "bench": (BACKEND_IP, BACKEND_PORT),
        "bench-server": (SERVER_IP, SERVICE_PORT),
    }
    for i in range(max(0, services - len(entries))):
        entries[f"svc{i:03d}"] = (FILLER_IP, SERVICE_PORT)
    for name, (address, target) in entries.items():
        text = SERVICE_ENTRY.format(name=name, port=SERVICE_PORT, address=address, target=target)
        (directory / f"{name}.yaml").write_text(text)


def sidecar_argv(grpc: str, ip: str, access_log: str, *meta: str) -> list[str]:
    argv = [
        str(BIN / "pilot-agent"),
        "proxy",
        "sidecar",
        "--discovery-address",
        grpc,
        "--bind-address",
        ip,
        "--meta",
        "INTERCEPTION_MODE=NONE",
        "--access-log",
        access_log,
        "--log-level",
        "warning",
    ]
    for item in meta:
        argv += ["--meta", item]
    return argv


def wait_ready(ip: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((ip, 15000), 1) as sock:
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise BenchError(f"sidecar on {ip} not ready after {timeout:.0f} s")


def probe(ip: str, port: int, host: str) -> str:
    """One request; the status line (to fail early with a clear message, not in wrk)."""
    with socket.create_connection((ip, port), 5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# The report


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    wrk_v = (
        subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        if shutil.which("wrk")  # h2_bench.py shares this and needs no wrk
        else subprocess.CompletedProcess([], 0, "", "")
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "haproxy": haproxy.split()[2] if haproxy else "?",
        "wrk": (wrk_v.stdout + wrk_v.stderr).split()[1] if (wrk_v.stdout + wrk_v.stderr) else "?",
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.0f} µs" if abs(ms) < 1 else f"{ms:.2f} ms"


def per_round_ratios(
    runs: dict[str, list[WrkResult]], singles: dict[str, list[WrkResult]]
) -> dict[str, list[float]]:
    """The target ratios within each round (the paths of one round ran back to back)."""
    out: dict[str, list[float]] = {
        "sidecar_vs_haproxy": [],
        "added_p99": [],
        "added_p99_haproxy": [],
        "added_p99_1": [],
        "added_p99_1_haproxy": [],
        "two_vs_direct": [],
    }
    for i in range(len(runs["direct"])):
        d, h, s, t = (runs[k][i] for k in ("direct", "haproxy", "sidecar", "two sidecars"))
        d1, h1, s1 = (singles[k][i] for k in ("direct", "haproxy", "sidecar"))
        out["sidecar_vs_haproxy"].append(s.rps / h.rps)
        out["added_p99"].append(s.p99_ms - d.p99_ms)
        out["added_p99_haproxy"].append(h.p99_ms - d.p99_ms)
        out["added_p99_1"].append(s1.p99_ms - d1.p99_ms)
        out["added_p99_1_haproxy"].append(h1.p99_ms - d1.p99_ms)
        out["two_vs_direct"].append(t.rps / d.rps)
    return out


def report(
    args: argparse.Namespace,
    facts: dict[str, str],
    load: dict[str, WrkResult],
    single: dict[str, WrkResult],
    rss: dict[str, float],
    ratios: dict[str, list[float]],
    soak: list[tuple[float, float, float]],
    soak_result: WrkResult | None,
) -> str:
    lines = [
        "## Proxy (HTTP/1.1)",
        "",
        f"`tools/bench/proxy_bench.py --duration {args.duration:g} --connections "
        f"{args.connections} --threads {args.threads} --rounds {args.rounds} --services "
        f"{args.services}` on "
        f"{facts['date']}: {facts['nproc']} cores ({facts['cpu']}), kernel {facts['kernel']}, "
        f"Python {facts['python']}, haproxy {facts['haproxy']}, wrk {facts['wrk']}; load "
        f"average at start {facts['load']}. Everything shares the {facts['nproc']} cores: "
        f"wrk ({args.threads} thread), the backend, the proxy under test and Pilot.",
        "",
        "Small GETs over HTTP/1.1 keep-alive. Backend: haproxy (`nbthread 1`) answering `200 ok`"
        " itself. haproxy as the proxy: `nbthread 1`, keep-alive to the backend. Sidecar:"
        " `pilot-agent proxy sidecar` (INTERCEPTION_MODE=NONE) fed by `pilot-discovery` with"
        f" {args.services} ServiceEntry services, wrk sending `Host: bench:9080` to 15001 (default"
        " route, no RouteRule), stats on, access log "
        + ("to a file" if args.access_log != "off" else "off")
        + ". Two sidecars: client sidecar outbound -> server sidecar inbound -> backend."
        f" Each figure is the median over {args.rounds} interleaved rounds"
        f" ({args.duration:g} s at {args.connections} connections after a 2 s warm-up, then"
        f" {max(3, args.duration / 2):g} s at 1 connection); proxy CPU is each proxy process's"
        " share of one core, machine busy all cores' (wrk and the kernel's loopback work"
        " included). Ratios are taken within each round, then their median. Other work on"
        f" the shared machine just before the runs: {facts['background']} cores busy"
        + (
            " (**noisy**: other work competed for the cores; rerun on a quiet machine)."
            if float(facts["background"]) > 0.25
            else "."
        ),
        "",
        f"| path | req/s ({args.connections} conns) | p50 | p99 | proxy CPU (cores) |"
        " machine busy (cores) | p50 (1 conn) | p99 (1 conn) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in load.items():
        one = single[name]
        cpu = " + ".join(f"{v:.2f}" for k, v in r.cpu.items() if k != "backend") or "-"
        lines.append(
            f"| {name} | {r.rps:,.0f} | {fmt_ms(r.p50_ms)} | {fmt_ms(r.p99_ms)} | {cpu} |"
            f" {r.machine:.2f} |"
            f" {fmt_ms(one.p50_ms)} | {fmt_ms(one.p99_ms)} | {r.errors or (one.errors or '-')} |"
        )

    def med(key: str) -> float:
        values = sorted(ratios[key])
        return values[(len(values) - 1) // 2]

    def each(key: str, ms: bool = False) -> str:
        return ", ".join(fmt_ms(v) if ms else f"{v:.2f}" for v in ratios[key])

    ratio_h, ratio_two = med("sidecar_vs_haproxy"), med("two_vs_direct")
    added_s, added_h = med("added_p99"), med("added_p99_haproxy")
    added_s1, added_h1 = med("added_p99_1"), med("added_p99_1_haproxy")
    soak_rss = [r for _, r, _ in soak]
    load_peak = max([rss["peak"], *soak_rss]) if soak_rss else rss["peak"]
    lines += [
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| sidecar / haproxy req/s | {ratio_h:.2f}x | >= {TARGETS['sidecar_vs_haproxy']:.1f}x"
        f" | {verdict(ratio_h >= TARGETS['sidecar_vs_haproxy'])}"
        f" (rounds: {each('sidecar_vs_haproxy')}) |",
        f"| added p99 over direct, {args.connections} conns: sidecar vs haproxy |"
        f" {fmt_ms(added_s)} vs {fmt_ms(added_h)} | <= haproxy's | {verdict(added_s <= added_h)}"
        f" (rounds: {each('added_p99', True)} vs"
        f" {each('added_p99_haproxy', True)}) |",
        f"| added p99 over direct, 1 conn: sidecar vs haproxy | {fmt_ms(added_s1)} vs"
        f" {fmt_ms(added_h1)} | <= haproxy's | {verdict(added_s1 <= added_h1)}"
        f" (rounds: {each('added_p99_1', True)} vs"
        f" {each('added_p99_1_haproxy', True)}) |",
        f"| two sidecars / direct req/s | {ratio_two:.2f}x | >= {TARGETS['two_vs_direct']:.1f}x"
        f" | {verdict(ratio_two >= TARGETS['two_vs_direct'])} (rounds: {each('two_vs_direct')}) |",
        f"| sidecar RSS idle, {args.services} services | {rss['idle']:.1f} MB |"
        f" < {TARGETS['idle_mb']:.0f} MB | {verdict(rss['idle'] < TARGETS['idle_mb'])} |",
        f"| sidecar RSS under load (peak, VmHWM) | {load_peak:.1f} MB |"
        f" < {TARGETS['load_mb']:.0f} MB | {verdict(load_peak < TARGETS['load_mb'])} |",
    ]
    if soak and soak_result is not None:
        first, last = soak_rss[0], soak_rss[-1]
        samples = ", ".join(f"{r:.1f}" for r in soak_rss)
        lines += [
            "",
            f"Soak: {soak[-1][0]:.0f} s of wrk at {args.connections} connections through the"
            f" sidecar ({soak_result.rps:,.0f} req/s, p99 {fmt_ms(soak_result.p99_ms)}"
            + (f", {soak_result.errors}" if soak_result and soak_result.errors else "")
            + f"); VmRSS (MB) every {args.soak_interval:g} s: {samples}. "
            f"First to last {last - first:+.1f} MB, min {min(soak_rss):.1f}, max"
            f" {max(soak_rss):.1f}.",
        ]
    lines += [
        "",
        f"Sidecar RSS: {rss['idle']:.1f} MB idle with {args.services} services,"
        f" {rss['idle_1']:.1f} MB right after start-up config (VmHWM {rss['hwm_idle']:.1f} MB"
        f" before any load). The server sidecar of the two-sidecar path: idle"
        f" {rss['server_idle']:.1f} MB, peak {rss['server_peak']:.1f} MB.",
        "",
    ]
    return "\n".join(lines)


def idle_report(args: argparse.Namespace, facts: dict[str, str], rss: dict[str, float]) -> str:
    """The idle-RSS figures alone (--idle-only: no wrk run, a few seconds in all)."""
    return "\n".join(
        [
            f"`tools/bench/proxy_bench.py --idle-only --services {args.services}` on"
            f" {facts['date']}: Python {facts['python']}, kernel {facts['kernel']}.",
            "",
            f"| sidecar RSS idle, {args.services} services | {rss['idle']:.1f} MB |"
            f" < {TARGETS['idle_mb']:.0f} MB | {verdict(rss['idle'] < TARGETS['idle_mb'])} |",
            "",
            f"Sidecar RSS: {rss['idle']:.1f} MB idle with {args.services} services,"
            f" {rss['idle_1']:.1f} MB right after start-up config (VmHWM"
            f" {rss['hwm_idle']:.1f} MB). The server sidecar: idle {rss['server_idle']:.1f} MB.",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Main


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise BenchError(
            f"`{binary}` is not installed; this benchmark needs wrk and haproxy "
            "(Debian: apt-get install -y wrk haproxy)"
        )
    return path


def run(args: argparse.Namespace) -> str:
    haproxy = need("haproxy")
    need("wrk")
    for name in ("pilot-discovery", "pilot-agent"):
        if not (BIN / name).exists():
            raise BenchError(f"{BIN / name} is missing; run `uv sync` in {ROOT}")
    for ip, port in (
        (BACKEND_IP, BACKEND_PORT),
        (HAPROXY_IP, HAPROXY_PORT),
        (CLIENT_IP, OUTBOUND),
        (CLIENT_IP, 15000),
        (SERVER_IP, SERVICE_PORT),
        (SERVER_IP, 15000),
    ):
        check_free(ip, port)
    facts = machine()
    facts["background"] = f"{background_busy():.2f}"
    c, dur, thr = args.connections, args.duration, args.threads
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmpname:
        tmp = Path(tmpname)
        procs = Procs(tmp)
        try:
            return _run(args, facts, procs, tmp, haproxy, c, dur, thr)
        finally:
            procs.stop_all()


def _run(
    args: argparse.Namespace,
    facts: dict[str, str],
    procs: Procs,
    tmp: Path,
    haproxy: str,
    c: int,
    dur: float,
    thr: int,
) -> str:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    (tmp / "backend.cfg").write_text(haproxy_backend_config())
    (tmp / "proxy.cfg").write_text(haproxy_proxy_config())
    backend = procs.start("backend", [haproxy, "-db", "-f", str(tmp / "backend.cfg")])
    hap = procs.start("haproxy", [haproxy, "-db", "-f", str(tmp / "proxy.cfg")])
    wait_port(backend, BACKEND_IP, BACKEND_PORT)
    wait_port(hap, HAPROXY_IP, HAPROXY_PORT)

    write_registry(tmp / "registry", args.services)
    (tmp / "config").mkdir()
    grpc = f"127.0.0.1:{free_port()}"
    pilot = procs.start(
        "pilot",
        [
            str(BIN / "pilot-discovery"),
            "--registry",
            f"file:{tmp / 'registry'}",
            "--config-store",
            f"file://{tmp / 'config'}",
            "--grpc-addr",
            grpc,
            "--http-addr",
            f"127.0.0.1:{free_port()}",
        ],
    )
    pilot.wait_for("serving xDS")
    client = procs.start("sidecar", sidecar_argv(grpc, CLIENT_IP, args.access_log))
    server = procs.start(
        "server-sidecar",
        sidecar_argv(
            grpc,
            SERVER_IP,
            "off",
            f"APP_HOST={BACKEND_IP}",
            f"APP_PORTS={SERVICE_PORT}:{BACKEND_PORT}",
        ),
    )
    wait_ready(CLIENT_IP)
    wait_ready(SERVER_IP)
    rss: dict[str, float] = {"idle_1": proc_status(client.pid, "VmRSS")}
    for ip, port, authority in (
        (CLIENT_IP, OUTBOUND, f"bench:{SERVICE_PORT}"),
        (CLIENT_IP, OUTBOUND, f"bench-server:{SERVICE_PORT}"),
        (SERVER_IP, SERVICE_PORT, f"bench-server:{SERVICE_PORT}"),
    ):
        status = probe(ip, port, authority)
        if not status.startswith("HTTP/1.1 200"):
            raise BenchError(f"{ip}:{port} Host {authority} answered {status!r}, not 200")
    time.sleep(3)  # idle: config applied, the probes' connections settled
    rss["idle"] = proc_status(client.pid, "VmRSS")
    rss["hwm_idle"] = proc_status(client.pid, "VmHWM")
    rss["server_idle"] = proc_status(server.pid, "VmRSS")
    say(f"sidecar idle VmRSS {rss['idle']:.1f} MB with {args.services} services")
    if args.idle_only:
        return idle_report(args, facts, rss)

    paths: dict[str, tuple[str, str | None, dict[str, int]]] = {
        "direct": (f"http://{BACKEND_IP}:{BACKEND_PORT}/", None, {"backend": backend.pid}),
        "haproxy": (
            f"http://{HAPROXY_IP}:{HAPROXY_PORT}/",
            None,
            {"haproxy": hap.pid, "backend": backend.pid},
        ),
        "sidecar": (
            f"http://{CLIENT_IP}:{OUTBOUND}/",
            f"bench:{SERVICE_PORT}",
            {"sidecar": client.pid, "backend": backend.pid},
        ),
        "two sidecars": (
            f"http://{CLIENT_IP}:{OUTBOUND}/",
            f"bench-server:{SERVICE_PORT}",
            {"sidecar": client.pid, "server": server.pid, "backend": backend.pid},
        ),
    }
    runs: dict[str, list[WrkResult]] = {name: [] for name in paths}
    singles: dict[str, list[WrkResult]] = {name: [] for name in paths}
    for round_ in range(args.rounds):  # interleaved, so a burst of other load hits one round
        for name, (url, host, watch) in paths.items():
            wrk(url, 2, c, thr, host)  # warm-up: upstream pools, first-request paths
            say(f"round {round_ + 1}/{args.rounds} {name}: {c} connections, {dur:g} s")
            r = wrk(url, dur, c, thr, host, watch)
            runs[name].append(r)
            say(
                f"  {r.rps:,.0f} req/s p50 {fmt_ms(r.p50_ms)} p99 {fmt_ms(r.p99_ms)} "
                f"cpu {', '.join(f'{k} {v:.2f}' for k, v in r.cpu.items())} "
                f"machine {r.machine:.2f}"
            )
            one = wrk(url, max(3, dur / 2), 1, 1, host, watch)
            singles[name].append(one)
            say(f"  1 conn: {one.rps:,.0f} req/s p50 {fmt_ms(one.p50_ms)} p99 {fmt_ms(one.p99_ms)}")
    ratios = per_round_ratios(runs, singles)
    load = {name: median_run(results) for name, results in runs.items()}
    single = {name: median_run(results) for name, results in singles.items()}
    rss["peak"] = proc_status(client.pid, "VmHWM")
    rss["server_peak"] = proc_status(server.pid, "VmHWM")

    soak: list[tuple[float, float, float]] = []
    soak_result = None
    seconds = 600.0 if args.full_soak else args.soak
    if seconds > 0:
        say(f"soak: {seconds:g} s through the sidecar, VmRSS every {args.soak_interval:g} s")
        url, host, watch = paths["sidecar"]
        box: dict[str, WrkResult] = {}
        errors: list[BaseException] = []

        def load_it() -> None:
            try:
                box["r"] = wrk(url, seconds, c, thr, host)
            except BaseException as error:  # reported below
                errors.append(error)

        runner = threading.Thread(target=load_it, daemon=True)
        start = time.monotonic()
        runner.start()
        while runner.is_alive():
            runner.join(args.soak_interval)
            if runner.is_alive():
                soak.append(
                    (
                        time.monotonic() - start,
                        proc_status(client.pid, "VmRSS"),
                        proc_status(client.pid, "VmHWM"),
                    )
                )
        if errors:
            raise errors[0]
        soak_result = box["r"]
        soak.append(
            (
                time.monotonic() - start,
                proc_status(client.pid, "VmRSS"),
                proc_status(client.pid, "VmHWM"),
            )
        )
        rss["peak"] = max(rss["peak"], proc_status(client.pid, "VmHWM"))
        say(f"  soak VmRSS {[round(r, 1) for _, r, _ in soak]}")
    return report(args, facts, load, single, rss, ratios, soak, soak_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per path")
    parser.add_argument("--services", type=int, default=100, help="services Pilot serves")
    parser.add_argument("--soak", type=float, default=60.0, help="soak seconds (0: none)")
    parser.add_argument("--full-soak", action="store_true", help="a 10-minute soak")
    parser.add_argument("--soak-interval", type=float, default=5.0)
    parser.add_argument("--access-log", default="off", help="the sidecar's (default off)")
    parser.add_argument("--markdown", type=Path, help="also write the section here")
    parser.add_argument(
        "--idle-only", action="store_true", help="only the idle RSS with --services (no wrk)"
    )
    args = parser.parse_args()
    try:
        text = run(args)
    except BenchError as error:
        sys.exit(f"proxy_bench: {error}")
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
