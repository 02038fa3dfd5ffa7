"""The sidecar's HTTP/2 and gRPC data path against haproxy and direct calls, on loopback.

    .venv/bin/python tools/bench/h2_bench.py [--duration 5] [--rounds 3] [--clients 4]
        [--streams 10] [--grpc-concurrency 16] [--markdown build/bench/h2_bench.md]

Needs `h2load` (Debian: nghttp2-client) and `haproxy` on PATH, and grpcio in this Python;
installs nothing. Everything runs in this one invocation, on loopback addresses 127.0.0.221-225
(so the ratios come from the same machine state):

HTTP/2, h2load (`-c --clients -m --streams`, h2c with prior knowledge) as the client:
  backend   haproxy (nbthread 1) on 127.0.0.221:8080, `bind ... proto h2`, answering every
            request itself with a fixed 200 "ok" (`http-request return`);
  direct    h2load -> backend;
  haproxy   h2load -> haproxy (nbthread 1) on 127.0.0.222 (`bind ... proto h2`) -> backend over
            h2c (`server ... proto h2`, `http-reuse always`: streams multiplexed);
  sidecar   h2load -> `pilot-agent proxy sidecar` (INTERCEPTION_MODE=NONE) on
            127.0.0.223:15001 with `:authority: bench:9080`: the default route of service `bench`
            (a ServiceEntry read by a real `pilot-discovery`) whose port is named `http2`, so its
            cluster is http2 and the sidecar speaks h2c, multiplexed, to the backend.

gRPC unary, a grpcio client (a subprocess running --grpc-concurrency concurrent calls on one
channel for --duration seconds, counting completed calls) and a grpc.aio echo server on
127.0.0.225:9091 (a subprocess):
  direct        client -> server;
  two sidecars  client -> client sidecar 15001 (authority `bench-grpc:9090`, a port named
                `grpc`) -> the server sidecar's inbound listener 127.0.0.224:9090 (APP_HOST and
                APP_PORTS point at the server) -> server.
Both gRPC paths use the same client, so the ratio is the proxies' cost, though a Python client
and server also take much of the cores.

Each path gets a short warm-up, then one run of --duration seconds, --rounds times interleaved;
each figure is the median over the rounds and each ratio the median of per-round ratios. CPU
time of each proxy process over each run is reported as a share of one core. Targets (issue 8,
Performance): sidecar >= 0.3x haproxy req/s over HTTP/2; two sidecars >= 0.5x direct gRPC
calls/s. The report is a markdown section ("## HTTP/2 and gRPC through the proxy (issue 8)")
printed to stdout (and written to --markdown when given). Every h2load and client run is bounded
by its duration and a timeout; all processes started here are stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (
    BIN,
    HAPROXY_GLOBAL,
    ROOT,
    BenchError,
    Procs,
    background_busy,
    check_free,
    cpu_seconds,
    fmt_ms,
    free_port,
    machine,
    machine_busy,
    need,
    proc_status,
    sidecar_argv,
    verdict,
    wait_port,
    wait_ready,
)

BACKEND_IP, HAPROXY_IP, CLIENT_IP, SERVER_IP, GRPC_IP = (
    "127.0.0.221",
    "127.0.0.222",
    "127.0.0.223",
    "127.0.0.224",
    "127.0.0.225",
)
BACKEND_PORT, HAPROXY_PORT, H2_SERVICE_PORT = 8080, 8081, 9080
GRPC_SERVICE_PORT, GRPC_APP_PORT = 9090, 9091
OUTBOUND = 15001
TARGETS = {"sidecar_vs_haproxy": 0.3, "two_vs_direct": 0.5}
GRPC_METHOD = "/bench.Echo/Echo"
GRPC_PAYLOAD = b"x" * 32
GRPC_READY = "grpc echo serving"
WINDOW_START, WINDOW_END = "measuring", "measured"  # the gRPC client's marks on stdout
H2_PATHS = ("direct", "haproxy", "sidecar")
GRPC_PATHS = ("direct", "two sidecars")

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: {port}, name: {port_name}, protocol: {protocol}}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {address}, ports: {{{port_name}: {target}}}, labels: {{app: {name}}}}}
"""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int  # completed successfully
    errors: str  # "" or a short description of failed requests or calls
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> share of one core
    machine: float = 0.0  # cores busy, all processes (the client, the kernel's loopback work...)
    client: float = 0.0  # the client's (h2load's, the gRPC client's) share of one core


def med(values: list[float]) -> float:
    """The median (the lower middle one of an even count)."""
    return sorted(values)[(len(values) - 1) // 2]


def median_run(results: list[Result]) -> Result:
    return Result(
        rps=med([r.rps for r in results]),
        p50_ms=med([r.p50_ms for r in results]),
        p99_ms=med([r.p99_ms for r in results]),
        requests=sum(r.requests for r in results),
        errors="; ".join(r.errors for r in results if r.errors),
        cpu={k: med([r.cpu[k] for r in results]) for k in results[0].cpu},
        machine=med([r.machine for r in results]),
        client=med([r.client for r in results]),
    )


def percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the clients this script waited for
    return usage.ru_utime + usage.ru_stime


def run_watched(
    name: str, argv: list[str], duration: float, watch: dict[str, int]
) -> tuple[str, dict[str, float], float, float]:
    """One bounded client run: its stdout, the CPU share of the `watch` processes over it, the
    cores busy machine-wide and the client's own share of one core."""
    cpu0 = {n: cpu_seconds(pid) for n, pid in watch.items()}
    busy0, total0 = machine_busy()
    client0 = children_cpu()
    start = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name} did not finish within {duration + 30:g} s") from None
    elapsed = time.monotonic() - start
    busy1, total1 = machine_busy()
    if done.returncode != 0:
        raise BenchError(f"{name} failed ({done.returncode}): {done.stderr or done.stdout}")
    cpu = {n: (cpu_seconds(pid) - cpu0[n]) / elapsed for n, pid in watch.items()}
    cores = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
    return done.stdout, cpu, cores, (children_cpu() - client0) / elapsed


# ---------------------------------------------------------------------------------------------
# h2load


def parse_h2load(out: str, log: Path) -> Result:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, out, re.M)
        if match is None:
            raise BenchError(f"h2load output lacks {pattern!r}:\n{out}")
        return match

    counts = find(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored, (\d+) timeout"
    )
    total, _, _, succeeded, failed, errored, timeout = (int(x) for x in counts.groups())
    codes = find(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    errors = []
    if failed or errored or timeout:
        errors.append(f"{failed} failed, {errored} errored, {timeout} timeout of {total}")
    non_2xx = sum(int(x) for x in codes.groups()[1:])
    if non_2xx:
        errors.append(f"{non_2xx} non-2xx ({codes.group(0)})")
    # --log-file: start (µs since the epoch), status, µs until the response ended; one a line.
    latencies = sorted(
        int(fields[2]) / 1000
        for line in log.read_text().splitlines()
        if len(fields := line.split("\t")) == 3 and fields[1].startswith("2")
    )
    return Result(
        rps=float(find(r"^finished in [\d.]+\w+, ([\d.]+) req/s").group(1)),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        requests=succeeded,
        errors="; ".join(errors),
    )


def h2load(
    url: str,
    duration: float,
    args: argparse.Namespace,
    tmp: Path,
    authority: str | None = None,
    watch: dict[str, int] | None = None,
) -> Result:
    log = tmp / "h2load.tsv"
    log.unlink(missing_ok=True)
    argv = [
        "h2load",
        "-c",
        str(args.clients),
        "-m",
        str(args.streams),
        "-D",
        f"{duration:g}",
        "-T",
        "10",  # a connection that sees nothing for 10 s counts as timed out
        "--log-file",
        str(log),
    ]
    if authority:
        argv += ["-H", f":authority: {authority}"]
    argv.append(url)
    out, cpu, cores, client = run_watched("h2load", argv, duration, watch or {})
    result = parse_h2load(out, log)
    result.cpu, result.machine, result.client = cpu, cores, client
    return result


# ---------------------------------------------------------------------------------------------
# The gRPC peers (run as subprocesses of this script: --role grpc-server / grpc-client)


async def grpc_server(address: str) -> None:
    import grpc

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        GRPC_METHOD.split("/")[1], {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    print(GRPC_READY, flush=True)
    await server.wait_for_termination()


async def grpc_client(
    target: str, authority: str | None, concurrency: int, warmup: float, duration: float
) -> dict[str, object]:
    """`concurrency` callers on one channel; completed calls and latencies over `duration`."""
    import grpc

    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    state = {"measuring": False, "stop": False}
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_METHOD)

        async def caller() -> None:
            while not state["stop"]:
                began = time.perf_counter()
                try:
                    await call(GRPC_PAYLOAD, timeout=5)
                except grpc.aio.AioRpcError as error:
                    if state["measuring"]:
                        failures[f"{error.code().name}: {error.details()}"] += 1
                    continue
                if state["measuring"]:
                    latencies.append((time.perf_counter() - began) * 1000)

        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        print(WINDOW_START, flush=True)  # the parent samples CPU times over the window
        began = time.perf_counter()
        await asyncio.sleep(duration)
        state["measuring"] = False
        elapsed = time.perf_counter() - began
        print(WINDOW_END, flush=True)
        state["stop"] = True
        await asyncio.wait_for(asyncio.gather(*callers), 10)
    latencies.sort()
    return {
        "calls": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "failures": dict(failures),
    }


def grpc_run(
    target: str,
    authority: str | None,
    duration: float,
    args: argparse.Namespace,
    watch: dict[str, int] | None = None,
) -> Result:
    """One bounded gRPC client run; CPU shares over its measured window (after its start-up
    and warm-up), which it marks on stdout."""
    argv = [
        sys.executable,
        __file__,
        "--role",
        "grpc-client",
        "--target",
        target,
        "--duration",
        f"{duration:g}",
        "--grpc-concurrency",
        str(args.grpc_concurrency),
    ]
    if authority:
        argv += ["--authority", authority]
    # stderr to a file, not a pipe: nobody reads it while the client runs
    with tempfile.TemporaryFile("w+") as errors_file:
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors_file, text=True)
        killer = threading.Timer(duration + 30, popen.kill)  # bounds every read below
        killer.start()
        try:
            cpu, cores = window(popen, {"client": popen.pid, **(watch or {})})
            assert popen.stdout is not None
            out = popen.stdout.read()
            popen.wait()
        finally:
            killer.cancel()
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        errors_file.seek(0)
        err = errors_file.read()
    try:
        data = json.loads(out)
    except ValueError:
        raise BenchError(f"grpc client failed ({popen.returncode}): {err or out!r}") from None
    if "client" not in cpu:
        raise BenchError(f"grpc client never ended its measured window: {err or out!r}")
    client = cpu.pop("client")
    failures: dict[str, int] = data["failures"]
    errors = ", ".join(f"{n} x {what}" for what, n in sorted(failures.items()))
    return Result(
        rps=float(data["rps"]),
        p50_ms=float(data["p50_ms"]),
        p99_ms=float(data["p99_ms"]),
        requests=int(data["calls"]),
        errors=f"{sum(failures.values())} failed calls ({errors})" if failures else "",
        cpu=cpu,
        machine=cores,
        client=client,
    )


def window(popen: subprocess.Popen[str], watch: dict[str, int]) -> tuple[dict[str, float], float]:
    """CPU shares of the `watch` processes and cores busy between the client's two marks
    ({} when it ends without them)."""
    assert popen.stdout is not None
    cpu0: dict[str, float] = {}
    busy0 = total0 = 0.0
    began = time.monotonic()
    for line in popen.stdout:
        if line.strip() == WINDOW_START:
            cpu0 = {n: cpu_seconds(pid) for n, pid in watch.items()}
            busy0, total0 = machine_busy()
            began = time.monotonic()
        elif line.strip() == WINDOW_END and cpu0:
            elapsed = time.monotonic() - began
            cpu = {n: (cpu_seconds(pid) - cpu0[n]) / elapsed for n, pid in watch.items()}
            busy1, total1 = machine_busy()
            return cpu, (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
    return {}, 0.0


# ---------------------------------------------------------------------------------------------
# The setup


def haproxy_backend_config() -> str:
    return (
        HAPROXY_GLOBAL
        + f"""
frontend backend
  bind {BACKEND_IP}:{BACKEND_PORT} proto h2
  http-request return status 200 content-type text/plain string ok
"""
    )


def haproxy_proxy_config() -> str:
    return (
        HAPROXY_GLOBAL
        + f"""
frontend proxy
  bind {HAPROXY_IP}:{HAPROXY_PORT} proto h2
  default_backend app
backend app
  http-reuse always
  server app {BACKEND_IP}:{BACKEND_PORT} proto h2 maxconn 1000
"""
    )


def write_registry(directory: Path) -> None:
    """`bench` (http2, the h2c backend) and `bench-grpc` (grpc, the server sidecar)."""
    directory.mkdir(parents=True)
    entries = {
        "bench": ("http2", "HTTP2", H2_SERVICE_PORT, BACKEND_IP, BACKEND_PORT),
        "bench-grpc": ("grpc", "GRPC", GRPC_SERVICE_PORT, SERVER_IP, GRPC_SERVICE_PORT),
    }
    for name, (port_name, protocol, port, address, target) in entries.items():
        text = SERVICE_ENTRY.format(
            name=name,
            port=port,
            port_name=port_name,
            protocol=protocol,
            address=address,
            target=target,
        )
        (directory / f"{name}.yaml").write_text(text)


def probe_h2(url: str, authority: str | None) -> None:
    """A few requests first, to fail early with a clear message rather than in a table."""
    argv = ["h2load", "-n", "10", "-c", "1", "-T", "5", url]
    if authority:
        argv[1:1] = ["-H", f":authority: {authority}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or "10 succeeded" not in done.stdout or " 0 2xx" in done.stdout:
        raise BenchError(f"h2load to {url} ({authority or 'no authority'}) failed:\n{done.stdout}")
    if "10 2xx" not in done.stdout:
        status = re.search(r"status codes: .*", done.stdout)
        raise BenchError(f"{url} ({authority}) answered {status and status.group(0)}, not 200")


# ---------------------------------------------------------------------------------------------
# The report


def per_round_ratios(
    h2: dict[str, list[Result]], grpc: dict[str, list[Result]]
) -> dict[str, list[float]]:
    return {
        "sidecar_vs_haproxy": [
            s.rps / h.rps for s, h in zip(h2["sidecar"], h2["haproxy"], strict=True)
        ],
        "two_vs_direct": [
            t.rps / d.rps for t, d in zip(grpc["two sidecars"], grpc["direct"], strict=True)
        ],
    }


def table(
    header: str, results: dict[str, Result], proxies: tuple[str, ...], server: str, unit: str
) -> list[str]:
    lines = [
        f"| {header} | {unit} | p50 | p99 | proxy CPU (cores) | client CPU | {server} CPU |"
        " machine busy (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        cpu = " + ".join(f"{r.cpu[k]:.2f} {k}" for k in proxies if k in r.cpu) or "-"
        lines.append(
            f"| {name} | {r.rps:,.0f} | {fmt_ms(r.p50_ms)} | {fmt_ms(r.p99_ms)} | {cpu} |"
            f" {r.client:.2f} | {r.cpu.get(server, 0.0):.2f} | {r.machine:.2f} |"
            f" {r.errors or '-'} |"
        )
    return lines


def report(
    args: argparse.Namespace,
    facts: dict[str, str],
    h2: dict[str, Result],
    grpc: dict[str, Result],
    ratios: dict[str, list[float]],
    rss: dict[str, float],
) -> str:
    noisy = float(facts["background"]) > 0.25
    lines = [
        "## HTTP/2 and gRPC through the proxy (issue 8)",
        "",
        f"`tools/bench/h2_bench.py --duration {args.duration:g} --rounds {args.rounds}"
        f" --clients {args.clients} --streams {args.streams} --grpc-concurrency"
        f" {args.grpc_concurrency}` (`make bench-h2`) on {facts['date']}: {facts['nproc']} cores"
        f" ({facts['cpu']}), kernel {facts['kernel']}, Python {facts['python']}, haproxy"
        f" {facts['haproxy']}, {facts['h2load']}, grpcio {facts['grpcio']}; load average at"
        f" start {facts['load']}. Everything shares the {facts['nproc']} cores: the client, the"
        " backend, the proxies under test and Pilot.",
        "",
        f"HTTP/2: h2load, h2c with prior knowledge, {args.clients} connections x {args.streams}"
        " concurrent streams, small GETs. Backend: haproxy (`nbthread 1`, `bind ... proto h2`)"
        " answering `200 ok` itself. haproxy as the proxy: `nbthread 1`, h2c in and h2c out"
        " (`server ... proto h2`, `http-reuse always`). Sidecar: `pilot-agent proxy sidecar`"
        " (INTERCEPTION_MODE=NONE) fed by `pilot-discovery` with a ServiceEntry whose port is"
        " named `http2` (so its cluster is http2: h2c upstream, multiplexed), h2load sending"
        " `:authority: bench:9080` to 15001 (default route), stats on, access log off.",
        "",
        f"gRPC unary: a grpcio client (asyncio, {args.grpc_concurrency} concurrent calls on one"
        " channel, 32-byte messages) against a grpc.aio echo server, both Python subprocesses."
        " Direct: client -> server. Two sidecars: client -> client sidecar 15001 (authority"
        " `bench-grpc:9090`, a port named `grpc`) -> server sidecar inbound (APP_HOST/APP_PORTS)"
        " -> server. ghz is not installed here, so the same grpcio client drives both paths.",
        "",
        f"Each figure is the median over {args.rounds} interleaved rounds ({args.duration:g} s"
        " each after a 1 s warm-up); ratios are taken within each round, then their median. p50 /"
        " p99 from h2load's per-request log and the gRPC client's own timings. Proxy, client"
        " and backend/server CPU are each process's share of one core; machine busy is all"
        " cores' (other sessions' work and the kernel's loopback work included). Other work on"
        " the shared machine just before the"
        f" runs: {facts['background']} cores busy"
        + (
            " (**noisy**: other work competed for the cores; rerun on a quiet machine)."
            if noisy
            else "."
        ),
        "",
        *table("HTTP/2 path", h2, ("haproxy", "sidecar"), "backend", "req/s"),
        "",
        *table("gRPC path", grpc, ("client sidecar", "server sidecar"), "server", "calls/s"),
    ]

    def each(key: str) -> str:
        return ", ".join(f"{v:.2f}" for v in ratios[key])

    ratio_h, ratio_two = med(ratios["sidecar_vs_haproxy"]), med(ratios["two_vs_direct"])
    errors = [f"{k} HTTP/2" for k, r in h2.items() if r.errors]
    errors += [f"{k} gRPC" for k, r in grpc.items() if r.errors]
    lines += [
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| HTTP/2: sidecar / haproxy req/s | {ratio_h:.2f}x |"
        f" >= {TARGETS['sidecar_vs_haproxy']:.1f}x"
        f" | {verdict(ratio_h >= TARGETS['sidecar_vs_haproxy'])}"
        f" (rounds: {each('sidecar_vs_haproxy')}) |",
        f"| gRPC: two sidecars / direct calls/s | {ratio_two:.2f}x |"
        f" >= {TARGETS['two_vs_direct']:.1f}x | {verdict(ratio_two >= TARGETS['two_vs_direct'])}"
        f" (rounds: {each('two_vs_direct')}) |",
        "",
        f"Errors: {', '.join(errors) if errors else 'none'} (failed, errored or timed-out"
        " h2load requests, non-2xx answers, failed gRPC calls). Sidecar VmRSS after the runs:"
        f" {rss['client']:.1f} MB (peak {rss['client_peak']:.1f}), the server sidecar"
        f" {rss['server']:.1f} MB (peak {rss['server_peak']:.1f}).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> str:
    haproxy = need("haproxy")
    if shutil.which("h2load") is None:
        raise BenchError("`h2load` is not installed (Debian: apt-get install -y nghttp2-client)")
    for name in ("pilot-discovery", "pilot-agent"):
        if not (BIN / name).exists():
            raise BenchError(f"{BIN / name} is missing; run `uv sync` in {ROOT}")
    for ip, port in (
        (BACKEND_IP, BACKEND_PORT),
        (HAPROXY_IP, HAPROXY_PORT),
        (CLIENT_IP, OUTBOUND),
        (CLIENT_IP, 15000),
        (SERVER_IP, GRPC_SERVICE_PORT),
        (SERVER_IP, 15000),
        (GRPC_IP, GRPC_APP_PORT),
    ):
        check_free(ip, port)
    facts = machine()
    h2load_v = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout
    facts["h2load"] = h2load_v.strip() or "h2load ?"
    import grpc

    facts["grpcio"] = grpc.__version__
    facts["background"] = f"{background_busy():.2f}"
    with tempfile.TemporaryDirectory(prefix="h2-bench-") as tmpname:
        tmp = Path(tmpname)
        procs = Procs(tmp)
        try:
            return _run(args, facts, procs, tmp, haproxy)
        finally:
            procs.stop_all()


def _run(
    args: argparse.Namespace, facts: dict[str, str], procs: Procs, tmp: Path, haproxy: str
) -> str:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    (tmp / "backend.cfg").write_text(haproxy_backend_config())
    (tmp / "proxy.cfg").write_text(haproxy_proxy_config())
    backend = procs.start("backend", [haproxy, "-db", "-f", str(tmp / "backend.cfg")])
    hap = procs.start("haproxy", [haproxy, "-db", "-f", str(tmp / "proxy.cfg")])
    server_app = procs.start(
        "grpc-server",
        [
            sys.executable,
            __file__,
            "--role",
            "grpc-server",
            "--target",
            f"{GRPC_IP}:{GRPC_APP_PORT}",
        ],
    )
    wait_port(backend, BACKEND_IP, BACKEND_PORT)
    wait_port(hap, HAPROXY_IP, HAPROXY_PORT)
    server_app.wait_for(GRPC_READY)

    write_registry(tmp / "registry")
    (tmp / "config").mkdir()
    xds = f"127.0.0.1:{free_port()}"
    pilot = procs.start(
        "pilot",
        [
            str(BIN / "pilot-discovery"),
            "--registry",
            f"file:{tmp / 'registry'}",
            "--config-store",
            f"file://{tmp / 'config'}",
            "--grpc-addr",
            xds,
            "--http-addr",
            f"127.0.0.1:{free_port()}",
        ],
    )
    pilot.wait_for("serving xDS")
    client = procs.start("sidecar", sidecar_argv(xds, CLIENT_IP, "off"))
    server = procs.start(
        "server-sidecar",
        sidecar_argv(
            xds,
            SERVER_IP,
            "off",
            f"APP_HOST={GRPC_IP}",
            f"APP_PORTS={GRPC_SERVICE_PORT}:{GRPC_APP_PORT}",
        ),
    )
    wait_ready(CLIENT_IP)
    wait_ready(SERVER_IP)
    h2_authority = f"bench:{H2_SERVICE_PORT}"
    grpc_authority = f"bench-grpc:{GRPC_SERVICE_PORT}"
    h2_paths: dict[str, tuple[str, str | None, dict[str, int]]] = {
        "direct": (f"http://{BACKEND_IP}:{BACKEND_PORT}/", None, {"backend": backend.pid}),
        "haproxy": (
            f"http://{HAPROXY_IP}:{HAPROXY_PORT}/",
            None,
            {"haproxy": hap.pid, "backend": backend.pid},
        ),
        "sidecar": (
            f"http://{CLIENT_IP}:{OUTBOUND}/",
            h2_authority,
            {"sidecar": client.pid, "backend": backend.pid},
        ),
    }
    grpc_paths: dict[str, tuple[str, str | None, dict[str, int]]] = {
        "direct": (f"{GRPC_IP}:{GRPC_APP_PORT}", None, {"server": server_app.pid}),
        "two sidecars": (
            f"{CLIENT_IP}:{OUTBOUND}",
            grpc_authority,
            {"client sidecar": client.pid, "server sidecar": server.pid, "server": server_app.pid},
        ),
    }
    for url, authority, _ in h2_paths.values():
        probe_h2(url, authority)
    for target, authority, _ in grpc_paths.values():
        probe = grpc_run(target, authority, 0.5, args)
        if probe.errors or not probe.requests:
            raise BenchError(f"gRPC to {target} ({authority}): {probe.errors or 'no calls'}")

    dur = args.duration
    h2_runs: dict[str, list[Result]] = {name: [] for name in h2_paths}
    grpc_runs: dict[str, list[Result]] = {name: [] for name in grpc_paths}
    for round_ in range(args.rounds):  # interleaved, so a burst of other load hits one round
        for name, (url, authority, watch) in h2_paths.items():
            h2load(url, 1, args, tmp, authority)  # warm-up: connections, first-request paths
            say(f"round {round_ + 1}/{args.rounds} HTTP/2 {name}: {dur:g} s")
            r = h2load(url, dur, args, tmp, authority, watch)
            h2_runs[name].append(r)
            say(describe(r, "req/s"))
        for name, (target, authority, watch) in grpc_paths.items():
            say(f"round {round_ + 1}/{args.rounds} gRPC {name}: {dur:g} s")
            r = grpc_run(target, authority, dur, args, watch)  # warms up for 1 s itself
            grpc_runs[name].append(r)
            say(describe(r, "calls/s"))
    rss = {
        "client": proc_status(client.pid, "VmRSS"),
        "client_peak": proc_status(client.pid, "VmHWM"),
        "server": proc_status(server.pid, "VmRSS"),
        "server_peak": proc_status(server.pid, "VmHWM"),
    }
    return report(
        args,
        facts,
        {name: median_run(results) for name, results in h2_runs.items()},
        {name: median_run(results) for name, results in grpc_runs.items()},
        per_round_ratios(h2_runs, grpc_runs),
        rss,
    )


def describe(r: Result, unit: str) -> str:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in {"client": r.client, **r.cpu}.items())
    errors = f" ERRORS {r.errors}" if r.errors else ""
    return (
        f"  {r.rps:,.0f} {unit} p50 {fmt_ms(r.p50_ms)} p99 {fmt_ms(r.p99_ms)} cpu {cpu}"
        f" machine {r.machine:.2f}{errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per path")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (-c)")
    parser.add_argument("--streams", type=int, default=10, help="h2load streams each (-m)")
    parser.add_argument(
        "--grpc-concurrency", type=int, default=16, help="concurrent gRPC calls (one channel)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the section here")
    # The gRPC peers run as subprocesses of this script.
    parser.add_argument(
        "--role",
        choices=("bench", "grpc-server", "grpc-client"),
        default="bench",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--authority", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "grpc-server":
        asyncio.run(grpc_server(args.target))
        return
    if args.role == "grpc-client":
        result = asyncio.run(
            grpc_client(args.target, args.authority, args.grpc_concurrency, 1.0, args.duration)
        )
        print(json.dumps(result))
        return
    try:
        text = run(args)
    except BenchError as error:
        sys.exit(f"h2_bench: {error}")
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
