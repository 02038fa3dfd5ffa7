"""Mixer: server Checks/s against a bare grpc.aio unary server, batched Report bags/s, and the
client library's cached Check, all on loopback.

    .venv/bin/python tools/bench/mixer_bench.py [--duration 5 --concurrency 64
        --report-batches 20 --markdown build/bench/mixer_bench.md]

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

Ratios are what matter (check/echo); absolute figures move with whatever else runs here. The
machine's load average before and after is reported beside them, and the check/echo ratio
also per second of server CPU (user+system time from /proc), which holds steadier when a
server gets less than its share of the cores.
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
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECK = "/istio.mixer.v1.Mixer/Check"
REPORT = "/istio.mixer.v1.Mixer/Report"

POLICY = """
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
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: denyreviewsv3, namespace: istio-system}
spec:
  match: destination.labels["app"] == "ratings" && source.labels["version"] == "v3"
  actions: [{handler: handler.denier, instances: [denyrequest.checknothing]}]
---
apiVersion: config.istio.io/v1alpha2
kind: listchecker
metadata: {name: whitelist, namespace: istio-system}
spec: {overrides: [v1, v2], blacklist: false}
---
apiVersion: config.istio.io/v1alpha2
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

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "istio.mixer.v1.Mixer", {"Check": grpc.unary_unary_rpc_method_handler(check)}
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
        self.config = config
        self.process: subprocess.Popen[str] | None = None
        self.directory = tempfile.TemporaryDirectory()

    def __enter__(self) -> Server:
        if self.config is None:
            command = [sys.executable, __file__, self.echo_flag, str(self.port)]
            marker = "ready"
        else:
            store = Path(self.directory.name)
            (store / "config.yaml").write_text(self.config)
            command = [
                sys.executable, "-m", "istio.mixer", "server",
                "--config-store", f"file://{store}",
                "--grpc-addr", f"127.0.0.1:{self.port}",
                "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}",
                "--prometheus-addr", f"127.0.0.1:{free_port()}",
                "--log-level", "warning",
            ]  # fmt: skip
            marker = None
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.process.stdout is not None
        if marker is not None:
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
    results = bench(options)
    text = markdown(results, options)
    print(text)
    print(json.dumps(results, indent=2), file=sys.stderr)
    if options.markdown:
        options.markdown.parent.mkdir(parents=True, exist_ok=True)
        options.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
