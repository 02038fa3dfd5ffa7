"""TCP splice throughput: a bulk transfer through the sidecar's tcp_proxy against Debian's
haproxy in TCP mode, in one run.

    .venv/bin/python tools/bench/tcp_bench.py [--seconds 5 --rounds 3 --streams 1]

iperf3 (C, Debian's) is both ends, so the proxy under test is the only Python in the path:
`iperf3 -s` on 127.0.0.211:5201, and `iperf3 -c` sending for `--seconds`
  direct     straight to the server;
  haproxy    through haproxy (`mode tcp`, `nbthread 1`) on 127.0.0.212:5201;
  sidecar    through `pilot-agent proxy sidecar` on 127.0.0.213 (INTERCEPTION_MODE=NONE, as the
             local platform runs it), fed by `pilot-discovery` with a ServiceEntry for a TCP
             service whose endpoint is the sidecar's workload: its inbound listener
             127.0.0.213:5201 splices to the server (APP_HOST), tcp_proxy with connection and
             byte stats on, as Pilot configures it.
Each path runs `--rounds` times, interleaved; the figure is the median, the ratio the median of
per-round ratios. Everything shares the machine's cores: the report says how busy they were.
Target (issue 8): sidecar >= 0.8x haproxy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (
    BIN,
    BenchError,
    Procs,
    background_busy,
    check_free,
    cpu_seconds,
    free_port,
    machine,
    machine_busy,
    need,
    proc_status,
    wait_port,
    wait_ready,
)

SERVER_IP, HAPROXY_IP, SIDECAR_IP = "127.0.0.211", "127.0.0.212", "127.0.0.213"
PORT = 5201
TCP_SERVICE = f"""\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: bulk}}
spec:
  hosts: [bulk.default.svc.cluster.local]
  ports: [{{number: {PORT}, name: tcp, protocol: TCP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: {SIDECAR_IP}, ports: {{tcp: {PORT}}}, labels: {{app: bulk}}}}
"""
HAPROXY_TCP = f"""\
global
  nbthread 1
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend bulk
  bind {HAPROXY_IP}:{PORT}
  default_backend bulk
backend bulk
  server bulk {SERVER_IP}:{PORT}
"""


def iperf(target: str, seconds: float, streams: int, watch: dict[str, int]) -> dict[str, float]:
    """One transfer to `target`; Gbit/s received, and the CPU share of the `watch` processes."""
    busy0, total0 = machine_busy()
    cpu0 = {name: cpu_seconds(pid) for name, pid in watch.items()}
    began = time.monotonic()
    out = subprocess.run(
        ["iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds), "-P", str(streams), "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    wall = time.monotonic() - began
    busy1, total1 = machine_busy()
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise BenchError(f"iperf3 to {target} failed: {out.stderr or out.stdout}") from None
    if "error" in report:
        raise BenchError(f"iperf3 to {target}: {report['error']}")
    received = report["end"]["sum_received"]["bits_per_second"] / 1e9
    result = {"gbps": received, "machine": (busy1 - busy0) / max(total1 - total0, 1) * 2}
    for name, pid in watch.items():
        result[f"cpu_{name}"] = (cpu_seconds(pid) - cpu0[name]) / wall
    return result


def run(args: argparse.Namespace) -> str:
    haproxy = need("haproxy")
    need("iperf3")
    for ip in (SERVER_IP, HAPROXY_IP, SIDECAR_IP):
        check_free(ip, PORT)
    check_free(SIDECAR_IP, 15000)
    facts = machine()
    facts["background"] = f"{background_busy():.2f}"
    with tempfile.TemporaryDirectory(prefix="tcp-bench-") as name:
        tmp = Path(name)
        procs = Procs(tmp)
        try:
            server = procs.start("iperf3", ["iperf3", "-s", "-B", SERVER_IP, "-p", str(PORT)])
            wait_port(server, SERVER_IP, PORT)
            (tmp / "haproxy.cfg").write_text(HAPROXY_TCP)
            hap = procs.start("haproxy", [haproxy, "-db", "-f", str(tmp / "haproxy.cfg")])
            wait_port(hap, HAPROXY_IP, PORT)
            (tmp / "registry").mkdir()
            (tmp / "registry" / "bulk.yaml").write_text(TCP_SERVICE)
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
            sidecar = procs.start(
                "sidecar",
                [
                    str(BIN / "pilot-agent"),
                    "proxy",
                    "sidecar",
                    "--discovery-address",
                    grpc,
                    "--bind-address",
                    SIDECAR_IP,
                    "--meta",
                    "INTERCEPTION_MODE=NONE",
                    "--meta",
                    f"APP_HOST={SERVER_IP}",
                    "--meta",
                    f"APP_PORTS={PORT}:{PORT}",
                    "--access-log",
                    "off",
                    "--log-level",
                    "warning",
                ],
            )
            wait_ready(SIDECAR_IP)
            wait_port(sidecar, SIDECAR_IP, PORT)
            paths = {
                "direct": (SERVER_IP, {"iperf3": server.pid}),
                "haproxy": (HAPROXY_IP, {"proxy": hap.pid}),
                "sidecar": (SIDECAR_IP, {"proxy": sidecar.pid}),
            }
            results: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
            for round_number in range(args.rounds):
                for path, (target, watch) in paths.items():
                    result = iperf(target, args.seconds, args.streams, watch)
                    results[path].append(result)
                    print(
                        f"round {round_number + 1} {path}: {result['gbps']:.2f} Gbit/s",
                        file=sys.stderr,
                        flush=True,
                    )
            rss = proc_status(sidecar.pid, "VmHWM")
        finally:
            procs.stop_all()
    return report(args, facts, results, rss)


def report(
    args: argparse.Namespace,
    facts: dict[str, str],
    results: dict[str, list[dict[str, float]]],
    rss: float,
) -> str:
    def med(path: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in results[path])

    ratios = [
        s["gbps"] / h["gbps"] for s, h in zip(results["sidecar"], results["haproxy"], strict=True)
    ]
    ratio = statistics.median(ratios)
    lines = [
        f"`tools/bench/tcp_bench.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--streams {args.streams}` on {facts['date']}: "
        f"{facts['nproc']} cores ({facts['cpu']}), kernel {facts['kernel']}, Python "
        f"{facts['python']}, haproxy {facts['haproxy']}, iperf3 as both ends; other work on the "
        f"machine just before: {facts['background']} cores busy.",
        "",
        "| path | Gbit/s (median) | proxy CPU (cores) | machine busy (cores) |",
        "|---|---:|---:|---:|",
    ]
    for path in results:
        cpu = med(path, "cpu_proxy") if path != "direct" else None
        lines.append(
            f"| {path} | {med(path, 'gbps'):.2f} | {'-' if cpu is None else f'{cpu:.2f}'} | "
            f"{med(path, 'machine'):.2f} |"
        )
    verdict = "met" if ratio >= 0.8 else "**missed**"
    lines += [
        "",
        f"Sidecar / haproxy (TCP splice): **{ratio:.2f}x** (target >= 0.8x, {verdict}; rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"). Sidecar peak RSS (VmHWM) {rss:.1f} MB.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1, help="parallel TCP connections")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    args = parser.parse_args()
    try:
        text = run(args)
    except BenchError as error:
        print(f"tcp_bench: {error}", file=sys.stderr)
        sys.exit(1)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
