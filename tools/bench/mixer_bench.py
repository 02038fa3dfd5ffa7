"""Mixer: server Checks/s against a bare grpc.aio unary server, batched Report bags/s, the
client library's cached Check, and the proxy's throughput with Mixer on against off, all on
loopback.

    .venv/bin/python tools/bench/mixer_bench.py [--sections server,proxy] [--duration 5
        --concurrency 64 --report-batches 20 --rounds 3 --connections 50
        --markdown build/bench/mixer_bench.md] [--profile-proxy FILE]
        [--mixer-reports process|inline] [--idle-burners]

Runs, each server in its own process (`mixs server` over a file config store) and the load
from another process (this file with --load), so that server and client do not share a loop:

  echo      a bare grpc.aio server answering /istio.mixer.v1.Mixer/Check with a fixed
            CheckResponse (bytes in, bytes out: no parsing), the ceiling for any grpc.aio
            service on this machine;
  echo-uvloop  the same on uvloop, the loop `mixs server` runs on: how much of the
            Check/echo ratio the loop accounts for;
  check     `mixs server` with a policy that makes every Check evaluate three rule matches
            (one false: a denier it skips), call a listchecker (whitelist, passes) and a
            memquota (RequestCount, large enough never to run out), and return referenced
            attributes and the quota grant; the same request bytes as echo, with
            `--concurrency` calls in flight over 4 channels for `--duration` seconds;
  report    `mixs server` with the default telemetry's Prometheus metrics (install/mixer:
            request_count, request_duration, request_size, response_size; TCP metrics
            whose rule does not match), sent `--report-batches` Reports of 1,000
            delta-encoded attribute bags each (as the client library batches them), one at a
            time: bags/s is records over the time to answer them all;
  cached    in this process: istio.mixerclient's MixerClient answering a Check from its cache
            (after one call to a canned transport), timed over 200,000 calls.

The proxy section (needs wrk and haproxy; addresses 127.0.0.231-234): wrk, `--connections`
keep-alive connections for `--duration` seconds after a 2 s warm-up, sends small GETs to the
inbound listener of a server sidecar (`pilot-agent proxy sidecar`, INTERCEPTION_MODE=NONE,
APP_HOST/APP_PORTS to a haproxy answering 200 itself), each sidecar fed by its own
`pilot-discovery`:

  off       no mixerAddress in the mesh config: no Mixer filter;
  on        mixerAddress: a `mixs server` with install/mixer's telemetry (Prometheus metrics
            and the stdio access log, written to a file) and two check rules (a denier whose
            match is false, a listchecker whitelist that passes): every request Checked
            (from the proxy's cache after the first of each valid period) and Reported
            (batched);
  stub      mixerAddress: the echo server above, answering Check and Report without work:
            the proxy's own cost of Mixer, with next to no Mixer CPU on the shared cores.

`--mixer-reports` is the Mixer-on sidecars' (default: process, pilot-agent's own default).
With `--idle-burners`, one busy loop per core at SCHED_IDLE takes whatever CPU nothing else
wants, in every run: the Mixer-off runs then do not get the idle core that the reporter process
takes in the Mixer-on runs (on this host a busy second core slows the sidecar's: Mixer-off went
from 48 to 62 µs of CPU per request with the loops running).

`--rounds` interleaved rounds; each ratio is taken within a round, then their median. The
report also gives each proxy's CPU and CPU time per request, Mixer's CPU, and what `mixs`
received (Checks and Reports on its monitoring port, request_count on its Prometheus port)
against the requests wrk counted.

Ratios are what matter (check/echo, on/off); absolute figures move with whatever else runs
here. The machine's load average before and after is reported beside them, and the
check/echo ratio also per second of server CPU (user+system time from /proc), which holds
steadier when a server gets less than its share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECK = "/istio.mixer.v1.Mixer/Check"
REPORT = "/istio.mixer.v1.Mixer/Report"

# The denier and the whitelist both policies use (each with its own rules).
DENIER = """
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {name: handler, namespace: istio-system}
spec: {status: {code: 7, message: Not allowed}}
---
apiVersion: config.istio.io/v1alpha2
kind: checknothing
metadata: {name: denyrequest, namespace: istio-system}
spec: {}
---
"""
WHITELIST = """
apiVersion: config.istio.io/v1alpha2
kind: listchecker
metadata: {name: whitelist, namespace: istio-system}
spec: {overrides: [v1, v2], blacklist: false}
---
"""

POLICY = (
    DENIER
    + """apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: denyreviewsv3, namespace: istio-system}
spec:
  match: destination.labels["app"] == "ratings" && source.labels["version"] == "v3"
  actions: [{handler: handler.denier, instances: [denyrequest.checknothing]}]
---
"""
    + WHITELIST
    + """apiVersion: config.istio.io/v1alpha2
kind: listentry
metadata: {name: sourceversion, namespace: istio-system}
spec: {value: 'source.labels["version"] | "none"'}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: checkversion, namespace: istio-system}
spec:
  match: destination.service == "ratings.*"
  actions: [{handler: whitelist.listchecker, instances: [sourceversion.listentry]}]
---
apiVersion: config.istio.io/v1alpha2
kind: memquota
metadata: {name: handler, namespace: istio-system}
spec:
  quotas: [{name: requestcount.quota.istio-system, maxAmount: 1000000000, validDuration: 1s}]
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {name: requestcount, namespace: istio-system}
spec:
  dimensions:
    source: source.labels["app"] | "unknown"
    destination: destination.service | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  match: request.method == "GET" || request.method == "POST"
  actions: [{handler: handler.memquota, instances: [requestcount.quota]}]
"""
)

BAG: dict[str, Any] = {
    "source.labels": {"app": "reviews", "version": "v2"},
    "source.service": "reviews.default.svc.cluster.local",
    "destination.service": "ratings.default.svc.cluster.local",
    "destination.labels": {"app": "ratings", "version": "v1"},
    "request.method": "GET",
    "request.path": "/ratings/0",
    "request.headers": {"x-request-id": "5a1c", "user-agent": "b", ":authority": "ratings:9080"},
    "context.protocol": "http",
}


def check_request() -> bytes:
    from istio.api.mixer.v1 import check_pb2
    from istio.mixerclient.attributes import GLOBAL_WORDS, encode

    request = check_pb2.CheckRequest(
        attributes=encode(BAG), global_word_count=len(GLOBAL_WORDS), deduplication_id="bench"
    )
    request.quotas["RequestCount"].amount = 1
    return request.SerializeToString()


def report_requests(batches: int) -> list[bytes]:
    from istio.mixerclient.client import encode_report

    requests = []
    for batch in range(batches):
        bags = []
        for i in range(1000):
            bags.append(
                {
                    **BAG,
                    "response.code": 200 if i % 20 else 503,
                    "response.duration": timedelta(milliseconds=(i % 50) + 1),
                    "request.size": 100 + i % 7,
                    "response.size": 1000 + (i * 13) % 5000,
                    "request.id": f"{batch}-{i}",
                }
            )
        requests += [r.SerializeToString() for r, _ in encode_report(bags)]
    return requests


# The load process.


async def load_checks(address: str, duration: float, concurrency: int) -> dict[str, Any]:
    import grpc

    payload = check_request()
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    calls = [c.unary_unary(CHECK) for c in channels]
    for call in calls:  # connect, and check the server answers
        await call(payload, timeout=10)
    done = 0
    failures = 0
    stop = time.perf_counter() + duration

    async def worker(call: Any) -> None:
        nonlocal done, failures
        while time.perf_counter() < stop:
            try:
                await call(payload, timeout=10)
                done += 1
            except grpc.aio.AioRpcError:
                failures += 1

    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return {
        "calls": done,
        "failures": failures,
        "per_second": done / elapsed,
        "client_cpu": (time.process_time() - cpu) / elapsed,
    }


async def load_reports(address: str, batches: int) -> dict[str, Any]:
    import grpc

    requests = report_requests(batches)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(REPORT)
        await call(requests[0], timeout=60)  # warm up (and the first batch's series exist)
        started = time.perf_counter()
        for request in requests:
            await call(request, timeout=60)
        elapsed = time.perf_counter() - started
    return {"bags": 1000 * batches, "per_second": 1000 * batches / elapsed, "seconds": elapsed}


# The servers.


def echo_server(port: int, on_uvloop: bool = False) -> None:
    import grpc

    from istio.api.mixer.v1 import check_pb2

    answer = check_pb2.CheckResponse()
    answer.precondition.valid_use_count = 10000
    answer.precondition.valid_duration.FromSeconds(10)
    reply = answer.SerializeToString()

    async def check(request: bytes, context: Any) -> bytes:
        return reply

    async def report(request: bytes, context: Any) -> bytes:
        return b""  # an empty ReportResponse

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "istio.mixer.v1.Mixer",
            {
                "Check": grpc.unary_unary_rpc_method_handler(check),
                "Report": grpc.unary_unary_rpc_method_handler(report),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    if on_uvloop:
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process: `mixs server` over a config directory, or the echo server."""

    def __init__(self, config: str | None, echo_flag: str = "--echo-server") -> None:
        self.echo_flag = echo_flag
        self.port = free_port()
        self.monitoring_port = free_port()
        self.prometheus_port = free_port()
        self.config = config
        self.process: subprocess.Popen[str] | None = None
        self.directory = tempfile.TemporaryDirectory()
        # mixs's stdout (the access log's lines, with the default telemetry) goes to a file:
        # a pipe nobody reads would fill and stall it
        self.log = Path(self.directory.name) / "mixs.log"

    def __enter__(self) -> Server:
        if self.config is None:
            command = [sys.executable, __file__, self.echo_flag, str(self.port)]
            marker = "ready"
        else:
            store = Path(self.directory.name) / "store"
            store.mkdir()
            (store / "config.yaml").write_text(self.config)
            command = [
                sys.executable, "-m", "istio.mixer", "server",
                "--config-store", f"file://{store}",
                "--grpc-addr", f"127.0.0.1:{self.port}",
                "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}",
                "--prometheus-addr", f"127.0.0.1:{self.prometheus_port}",
                "--log-level", "warning",
            ]  # fmt: skip
            marker = None
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE if marker else log, stderr=subprocess.STDOUT,
                text=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        if marker is not None:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if marker not in line:
                raise RuntimeError(f"the server did not start: {line}")
        else:
            self._wait_for_config()
        return self

    def _wait_for_config(self) -> None:
        """Until Mixer's /debug/configz shows the config in force."""
        import urllib.request

        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{self.monitoring_port}/debug/configz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    state = json.loads(response.read())
                if state["problems"]:
                    raise RuntimeError("mixs refused the config: " + "; ".join(state["problems"]))
                if state["generation"] >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("mixs did not put the config in force within 30 s")

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)
        self.directory.cleanup()


def h2load_checks(port: int, duration: float, concurrency: int, workdir: Path) -> dict[str, Any]:
    """Checks/s from h2load (C, one thread: the load costs far less CPU than a Python client)
    posting the same gRPC-framed CheckRequest over 4 connections."""
    payload = check_request()
    body = workdir / "check.grpc"
    body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
    streams = max(1, concurrency // 4)
    command = [
        "h2load", "-c", "4", "-m", str(streams), "-t", "1", "-D", f"{duration:g}",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(body), f"http://127.0.0.1:{port}{CHECK}",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    done = succeeded = 0
    per_second = 0.0
    for line in output.splitlines():
        if line.startswith("finished in"):
            per_second = float(line.split(",")[1].split()[0])
        if line.startswith("requests:"):
            parts = line.replace(",", "").split()
            done, succeeded = int(parts[1]), int(parts[7])
    return {"calls": done, "failures": done - succeeded, "per_second": per_second}


def run_load(arguments: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--load", *arguments],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def machine_load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def cached_check_cost(calls: int = 200_000) -> float:
    """Microseconds per MixerClient.check answered from the cache."""
    from istio.api.mixer.v1 import check_pb2
    from istio.mixerclient.attributes import GLOBAL_INDEX
    from istio.mixerclient.client import MixerClient

    class Canned:
        async def check(self, request: bytes) -> bytes:
            response = check_pb2.CheckResponse()
            response.precondition.valid_duration.FromSeconds(3600)
            response.precondition.valid_use_count = 10**9
            references = response.precondition.referenced_attributes
            for name in ("destination.service", "source.labels"):
                match = references.attribute_matches.add()
                match.name = GLOBAL_INDEX[name]
                match.condition = check_pb2.ReferencedAttributes.EXACT
            return response.SerializeToString()

        async def report(self, request: bytes) -> bytes:
            return b""

    async def run() -> float:
        client = MixerClient(Canned())
        await client.check(BAG)
        started = time.perf_counter()
        for _ in range(calls):
            await client.check(BAG)
        elapsed = time.perf_counter() - started
        assert client.stats.check_calls == 1
        return elapsed / calls * 1e6

    return asyncio.run(run())


# The proxy with Mixer off and on: wrk through a server sidecar's inbound listener.

PROXY_BACKEND_IP, OFF_IP, ON_IP, STUB_IP = (
    "127.0.0.231",
    "127.0.0.232",
    "127.0.0.233",
    "127.0.0.234",
)
PROXY_BACKEND_PORT, SERVICE_PORT = 8080, 9080
PROXY_TARGET = 0.8
# One service whose endpoints are the server sidecars: each sidecar's Pilot gives it
# the inbound listener of its own endpoint (its Mixer attributes: destination.service
# bench-server..., destination.labels app=bench-server, version=v1).
PROXY_SERVICE = f"""\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: bench-server}}
spec:
  hosts: [bench-server.default.svc.cluster.local]
  ports: [{{number: {SERVICE_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {OFF_IP}, labels: {{app: bench-server, version: v1}}}}
  - {{address: {ON_IP}, labels: {{app: bench-server, version: v1}}}}
  - {{address: {STUB_IP}, labels: {{app: bench-server, version: v1}}}}
"""
# The check rules every proxied request meets (besides install/mixer's telemetry): a denier
# whose match is false for it, and a listchecker whitelist that passes. Mixer's answer
# references destination.labels only, so the proxy's cache answers all but the first Check of
# each valid period (10 s, 10,000 uses).
PROXY_POLICY = (
    DENIER
    + """apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: denyratings, namespace: istio-system}
spec:
  match: destination.labels["app"] == "ratings"
  actions: [{handler: handler.denier, instances: [denyrequest.checknothing]}]
---
"""
    + WHITELIST
    + """apiVersion: config.istio.io/v1alpha2
kind: listentry
metadata: {name: destinationversion, namespace: istio-system}
spec: {value: 'destination.labels["version"] | "none"'}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: checkversion, namespace: istio-system}
spec:
  actions: [{handler: whitelist.listchecker, instances: [destinationversion.listentry]}]
"""
)


def scrape(port: int) -> dict[str, float]:
    """A Prometheus /metrics page as {series (name and labels): value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def total(metrics: dict[str, float], name: str) -> float:
    """The sum of every series of `name` (all label sets)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def proxy_section(options: argparse.Namespace) -> dict[str, Any]:
    """wrk (keep-alive small GETs) through server sidecars' inbound listeners to a haproxy that
    answers 200 itself. Three sidecars, each with its own Pilot: `off` (no mixerAddress),
    `on` (mixerAddress: a real `mixs server`; every request Checked, mostly from the proxy's
    cache, and Reported in batches) and `stub` (mixerAddress: the echo server, answering Check
    and Report without work: the proxy's own cost of Mixer, with next to nothing else taking
    the cores). Interleaved rounds; each ratio is taken within a round."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from proxy_bench import (  # the wrk and process helpers of the proxy benchmark
        BIN,
        HAPROXY_GLOBAL,
        BenchError,
        Procs,
        background_busy,
        check_free,
        need,
        probe,
        sidecar_argv,
        wait_port,
        wait_ready,
        wrk,
    )

    haproxy = need("haproxy")
    need("wrk")
    modes = {"off": OFF_IP, "on": ON_IP, "stub": STUB_IP}
    check_free(PROXY_BACKEND_IP, PROXY_BACKEND_PORT)
    for ip in modes.values():
        check_free(ip, SERVICE_PORT)
        check_free(ip, 15000)
    results: dict[str, Any] = {"background": background_busy()}
    telemetry = (ROOT / "install" / "mixer" / "telemetry.yaml").read_text()
    burners = idle_burners() if options.idle_burners else []
    with (
        Server(telemetry + "\n---\n" + PROXY_POLICY) as mixs,
        Server(None) as stub,
        tempfile.TemporaryDirectory(prefix="mixer-proxy-bench-") as tmpname,
    ):
        tmp = Path(tmpname)
        procs = Procs(tmp)
        try:
            (tmp / "backend.cfg").write_text(
                HAPROXY_GLOBAL
                + f"frontend backend\n  bind {PROXY_BACKEND_IP}:{PROXY_BACKEND_PORT}\n"
                "  http-request return status 200 content-type text/plain string ok\n"
            )
            backend = procs.start("backend", [haproxy, "-db", "-f", str(tmp / "backend.cfg")])
            wait_port(backend, PROXY_BACKEND_IP, PROXY_BACKEND_PORT)
            (tmp / "registry").mkdir()
            (tmp / "registry" / "bench-server.yaml").write_text(PROXY_SERVICE)
            (tmp / "config").mkdir()
            sidecars = {}
            for mode, ip in modes.items():
                grpc = f"127.0.0.1:{free_port()}"
                pilot_argv = [
                    str(BIN / "pilot-discovery"),
                    *("--registry", f"file:{tmp / 'registry'}"),
                    *("--config-store", f"file://{tmp / 'config'}"),
                    *("--grpc-addr", grpc),
                    *("--http-addr", f"127.0.0.1:{free_port()}"),
                ]
                if mode != "off":
                    mesh = tmp / f"mesh-{mode}.yaml"
                    port = mixs.port if mode == "on" else stub.port
                    mesh.write_text(f"mixerAddress: 127.0.0.1:{port}\n")
                    pilot_argv += ["--mesh-config", str(mesh)]
                procs.start(f"pilot-{mode}", pilot_argv).wait_for("serving xDS")
                argv = sidecar_argv(
                    grpc,
                    ip,
                    "off",
                    f"APP_HOST={PROXY_BACKEND_IP}",
                    f"APP_PORTS={SERVICE_PORT}:{PROXY_BACKEND_PORT}",
                )
                argv += ["--mixer-reports", options.mixer_reports]
                if options.profile_proxy and mode == "on":
                    # the stats are written when the sidecar exits (SIGTERM at the end)
                    argv = [sys.executable, "-m", "cProfile", "-o", str(options.profile_proxy),
                            *argv]  # fmt: skip
                sidecars[mode] = procs.start(f"sidecar-{mode}", argv)
            host = f"bench-server:{SERVICE_PORT}"
            for ip in modes.values():
                wait_ready(ip)
                status = probe(ip, SERVICE_PORT, host)
                if not status.startswith("HTTP/1.1 200"):
                    raise BenchError(f"{ip}:{SERVICE_PORT} answered {status!r}, not 200")
            sent = 1  # requests to the Mixer-on sidecar: the probe, the warm-ups, the runs
            before = scrape(mixs.monitoring_port)
            if total(before, "mixer_check_total") < 1:
                raise BenchError("the Mixer-on sidecar's probe was not Checked: is Mixer on?")
            runs: dict[str, list[Any]] = {mode: [] for mode in modes}
            mixer_cpu: dict[str, list[float]] = {"on": [], "stub": []}
            servers = {"on": mixs, "stub": stub}
            for round_ in range(options.rounds):
                for mode, ip in modes.items():
                    url = f"http://{ip}:{SERVICE_PORT}/"
                    warm = wrk(url, 2, options.connections, 1, host)
                    watch = watched(sidecars[mode].pid)
                    server = servers.get(mode)
                    server_before = server.cpu_seconds() if server else 0.0
                    started = time.monotonic()
                    result = wrk(url, options.duration, options.connections, 1, host, watch)
                    if server is not None:
                        mixer_cpu[mode].append(
                            (server.cpu_seconds() - server_before) / (time.monotonic() - started)
                        )
                    if mode == "on":
                        sent += warm.requests + result.requests
                    runs[mode].append(result)
                    print(
                        f"round {round_ + 1} Mixer {mode}: {result.rps:,.0f} req/s, proxy CPU "
                        f"{result.cpu['proxy']:.2f}, machine {result.machine:.2f}"
                        + (f", Mixer CPU {mixer_cpu[mode][-1]:.2f}" if server else "")
                        + (f" ({result.errors})" if result.errors else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            # Side by side: wrk to `off` and to `stub` at the same time, so both sidecars meet
            # the same neighbours (other sessions' work comes and goes between sequential runs).
            pair: dict[str, Any] = {}
            threads = [
                threading.Thread(
                    target=lambda mode=mode: pair.__setitem__(
                        mode,
                        wrk(
                            f"http://{modes[mode]}:{SERVICE_PORT}/",
                            options.duration,
                            options.connections // 2,
                            1,
                            host,
                            watched(sidecars[mode].pid),
                        ),
                    )
                )
                for mode in ("off", "stub")
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if set(pair) != {"off", "stub"}:
                raise BenchError("a side-by-side wrk run failed (see above)")
            print(
                "side by side: "
                + ", ".join(
                    f"{m} {r.rps:,.0f} req/s proxy CPU {r.cpu['proxy']:.2f}"
                    for m, r in pair.items()
                ),
                file=sys.stderr,
                flush=True,
            )
            # The last batch goes out within report_batch_interval (1 s): wait for Mixer to
            # have every record, or for its count to stop moving.
            deadline = time.monotonic() + 10
            last = -1.0
            after = before
            while time.monotonic() < deadline:
                time.sleep(1.5)
                after = scrape(mixs.monitoring_port)
                records = total(after, "mixer_report_records_total")
                if records >= sent or records == last:
                    break
                last = records
            prometheus = scrape(mixs.prometheus_port)
        finally:
            procs.stop_all()
            for burner in burners:
                burner.kill()
                burner.wait()
    results.update(
        {
            "runs": runs,
            "side_by_side": pair,
            "mixer_cpu": mixer_cpu,
            "ratios": {
                mode: [r.rps / off.rps for off, r in zip(runs["off"], runs[mode], strict=True)]
                for mode in ("on", "stub")
            },
            "requests_sent": sent,
            "checks": total(after, "mixer_check_total"),
            "reports": total(after, "mixer_report_total"),
            "report_records": total(after, "mixer_report_records_total"),
            "request_count": total(prometheus, "request_count_total")
            or total(prometheus, "request_count"),
        }
    )
    return results


def median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def cpu_per_request(runs: list[Any], process: str = "proxy") -> list[float]:
    """Microseconds of a process's CPU time per request in each run (0 without it)."""
    return [r.cpu.get(process, 0.0) / r.rps * 1e6 for r in runs]


BURN = """
import os
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""


def idle_burners() -> list[subprocess.Popen[bytes]]:
    """One busy loop per core at SCHED_IDLE: they run only on CPU nothing else wants, so every
    run meets a machine with no idle CPU left (they are killed with the sidecars)."""
    return [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(os.cpu_count() or 1)]


def watched(pid: int) -> dict[str, int]:
    """What a run's CPU is read of: the sidecar, and its Mixer reporter process if any."""
    found = {"proxy": pid}
    reporter = child_pid(pid)
    if reporter is not None:
        found["reporter"] = reporter
    return found


def child_pid(pid: int) -> int | None:
    """A process's (first) child: the sidecar's Mixer reporter process, once started."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def reporter_cell(runs: list[Any]) -> str:
    if not any("reporter" in r.cpu for r in runs):
        return "-"
    return f"{median(cpu_per_request(runs, 'reporter')):.0f} µs"


def proxy_markdown(results: dict[str, Any], options: argparse.Namespace) -> str:
    runs, ratios = results["runs"], results["ratios"]
    burning = "idle CPU taken by SCHED_IDLE busy loops, " if options.idle_burners else ""
    lines = [
        f"Inbound listener, wrk keep-alive GETs, {options.connections} connections, Mixer "
        f"Reports made `--mixer-reports {options.mixer_reports}`, {burning}"
        f"{options.duration:g} s per run after a 2 s warm-up, {options.rounds} interleaved "
        f"rounds (medians; each ratio is the round's, then their median); other work on the "
        f"machine before the run: {results['background']:.2f} cores busy.",
        "",
        "| Mixer | req/s | p50 | p99 | proxy CPU (cores) | proxy CPU per request "
        "| reporter CPU per request | Mixer's CPU (cores) | machine busy (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"off": "off", "on": "on (`mixs`)", "stub": "on (stub Mixer)"}
    for mode, name in names.items():
        mixer = results["mixer_cpu"].get(mode)
        lines.append(
            f"| {name} | {median([r.rps for r in runs[mode]]):,.0f} "
            f"| {median([r.p50_ms for r in runs[mode]]):.2f} ms "
            f"| {median([r.p99_ms for r in runs[mode]]):.2f} ms "
            f"| {median([r.cpu['proxy'] for r in runs[mode]]):.2f} "
            f"| {median(cpu_per_request(runs[mode])):.0f} µs "
            f"| {reporter_cell(runs[mode])} "
            f"| {'-' if mixer is None else f'{median(mixer):.2f}'} "
            f"| {median([r.machine for r in runs[mode]]):.2f} |"
        )
    errors = "; ".join(r.errors for rs in runs.values() for r in rs if r.errors) or "none"
    lines += ["", "| ratio | measured | target |", "|---|---|---|"]
    for mode in ("on", "stub"):
        ratio = median(ratios[mode])
        # What the proxy would keep were it CPU-bound on a core of its own: the inverse
        # ratio of its CPU time per request, per round.
        alone = [
            o / n
            for o, n in zip(cpu_per_request(runs["off"]), cpu_per_request(runs[mode]), strict=True)
        ]
        verdict = "met" if ratio >= PROXY_TARGET else "**missed**"
        lines += [
            f"| {names[mode]} / off req/s | **{ratio:.2f}x** (rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios[mode])}) | >= {PROXY_TARGET}x, {verdict} |",
            f"| proxy CPU per request, off / {names[mode]} | {median(alone):.2f}x (rounds: "
            f"{', '.join(f'{r:.2f}' for r in alone)}) | |",
        ]
    off, stub = results["side_by_side"]["off"], results["side_by_side"]["stub"]
    lines += [
        "",
        f"Side by side (wrk to `off` and to the stub-Mixer sidecar at once, "
        f"{options.connections // 2} connections each, {options.duration:g} s): off "
        f"{off.rps:,.0f} req/s at {off.cpu['proxy']:.2f} cores "
        f"({cpu_per_request([off])[0]:.0f} µs/request), stub Mixer {stub.rps:,.0f} req/s at "
        f"{stub.cpu['proxy']:.2f} cores ({cpu_per_request([stub])[0]:.0f} µs/request): "
        f"**{stub.rps / off.rps:.2f}x** the requests, "
        f"{cpu_per_request([off])[0] / cpu_per_request([stub])[0]:.2f}x per CPU second.",
        "",
        f"`mixs` received: {results['checks']:,.0f} Checks, {results['reports']:,.0f} Reports "
        f"carrying {results['report_records']:,.0f} records; its request_count (42422) "
        f"{results['request_count']:,.0f}, for {results['requests_sent']:,} requests wrk "
        f"counted through the Mixer-on sidecar (probe, warm-ups and runs). Errors: {errors}.",
    ]
    return "\n".join(lines)


def bench(options: argparse.Namespace) -> dict[str, Any]:
    load_arguments = [
        *("--duration", str(options.duration)),
        *("--concurrency", str(options.concurrency)),
    ]
    results: dict[str, Any] = {"load_before": machine_load()}
    servers = (
        ("echo", None, "--echo-server"),
        ("echo_uvloop", None, "--echo-server-uvloop"),
        ("check", POLICY, ""),
    )
    for name, config, echo_flag in servers:
        with Server(config, echo_flag) as server, tempfile.TemporaryDirectory() as workdir:
            before = server.cpu_seconds()
            if options.python_load:
                results[name] = run_load(["checks", f"127.0.0.1:{server.port}", *load_arguments])
            else:
                results[name] = h2load_checks(
                    server.port, options.duration, options.concurrency, Path(workdir)
                )
            results[name]["server_cpu"] = (server.cpu_seconds() - before) / options.duration
    telemetry = (ROOT / "install" / "mixer" / "telemetry.yaml").read_text()
    prometheus_only = "\n---\n".join(
        d
        for d in telemetry.split("\n---\n")
        if "kind: stdio" not in d and "name: stdio" not in d and "kind: logentry" not in d
    )
    with Server(prometheus_only) as server:
        results["report"] = run_load(
            ["reports", f"127.0.0.1:{server.port}", "--report-batches", str(options.report_batches)]
        )
    results["cached_check_us"] = cached_check_cost()
    results["load_after"] = machine_load()
    results["ratio"] = results["check"]["per_second"] / results["echo"]["per_second"]
    results["ratio_uvloop"] = results["check"]["per_second"] / results["echo_uvloop"]["per_second"]
    # The same ratio per second of server CPU: steadier when other work takes turns on the
    # cores (a server that got less CPU in its 5 s shows it in calls/s, not in calls/CPU-s).
    for name, _, _ in servers:
        run = results[name]
        run["per_cpu_second"] = run["per_second"] / run["server_cpu"] if run["server_cpu"] else 0.0
    results["ratio_cpu"] = (
        results["check"]["per_cpu_second"] / results["echo"]["per_cpu_second"]
        if results["echo"]["per_cpu_second"]
        else 0.0
    )
    return results


def markdown(results: dict[str, Any], options: argparse.Namespace) -> str:
    echo, check, report = results["echo"], results["check"], results["report"]
    echo_uvloop = results["echo_uvloop"]
    return "\n".join(
        [
            f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}; load average {results['load_before']} before, "
            f"{results['load_after']} after (other sessions' work shares these cores).",
            "",
            "| measure | figure |",
            "|---|---|",
            f"| bare grpc.aio unary (echo) | {echo['per_second']:,.0f} calls/s "
            f"(server CPU {echo['server_cpu']:.0%}) |",
            f"| the same echo on uvloop | {echo_uvloop['per_second']:,.0f} calls/s "
            f"(server CPU {echo_uvloop['server_cpu']:.0%}) |",
            f"| `mixs server` Check (3 rules, listchecker, memquota) | {check['per_second']:,.0f} "
            f"Checks/s (server CPU {check['server_cpu']:.0%}) |",
            f"| Check / echo | **{results['ratio']:.2f}x** (target 0.7x) |",
            f"| Check / echo on uvloop | {results['ratio_uvloop']:.2f}x |",
            f"| Check / echo per server CPU-second ({check['per_cpu_second']:,.0f} / "
            f"{echo['per_cpu_second']:,.0f}) | {results['ratio_cpu']:.2f}x |",
            f"| batched Report (1,000 bags per Report, default Prometheus telemetry) | "
            f"**{report['per_second']:,.0f} bags/s** (target 50,000) |",
            f"| MixerClient Check from its cache | **{results['cached_check_us']:.1f} µs** "
            "(target < 20 µs) |",
            "",
            f"({options.concurrency} calls in flight over 4 connections for {options.duration:g} s "
            f"per server, from {'a grpc.aio client' if options.python_load else 'h2load'}; "
            f"{check['failures']} failed calls.)",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--report-batches", type=int, default=20)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--sections",
        default="server,proxy",
        help="comma-separated: server (echo, check, report, cached), proxy (wrk through a "
        "sidecar with Mixer off and on; needs wrk and haproxy)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="proxy: interleaved rounds")
    parser.add_argument("--connections", type=int, default=50, help="proxy: wrk connections")
    parser.add_argument(
        "--idle-burners",
        action="store_true",
        help="proxy: keep every core's idle time taken by SCHED_IDLE busy loops, so that the "
        "Mixer-off runs do not get the idle CPU the reporter process takes in the Mixer-on runs",
    )
    parser.add_argument(
        "--mixer-reports",
        choices=("process", "inline"),
        default="process",
        help="proxy: the Mixer-on sidecars' --mixer-reports (where Reports are made)",
    )
    parser.add_argument(
        "--profile-proxy",
        type=Path,
        default=None,
        metavar="FILE",
        help="proxy: run the Mixer-on sidecar under cProfile, its stats to FILE (slows that "
        "sidecar: its req/s and the ratio are then not the proxy's)",
    )
    parser.add_argument(
        "--python-load",
        action="store_true",
        help="load Checks from a grpc.aio client process instead of h2load",
    )
    parser.add_argument("--load", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-server-uvloop", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.echo_server:
        echo_server(options.echo_server)
        return 0
    if options.echo_server_uvloop:
        echo_server(options.echo_server_uvloop, on_uvloop=True)
        return 0
    if options.load:
        kind, address = options.load
        if kind == "checks":
            result = asyncio.run(load_checks(address, options.duration, options.concurrency))
        else:
            result = asyncio.run(load_reports(address, options.report_batches))
        print(json.dumps(result))
        return 0
    sections = set(options.sections.split(","))
    unknown = sections - {"server", "proxy"}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))} (server, proxy)")
    texts = []
    if "server" in sections:
        results = bench(options)
        print(json.dumps(results, indent=2), file=sys.stderr)
        texts.append(markdown(results, options))
    if "proxy" in sections:
        proxy = proxy_section(options)
        texts.append(proxy_markdown(proxy, options))
    text = "\n\n".join(texts)
    print(text)
    if options.markdown:
        options.markdown.parent.mkdir(parents=True, exist_ok=True)
        options.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
