"""Mutual TLS between sidecars against plaintext between sidecars, in one run, on loopback.

    .venv/bin/python tools/bench/mtls_bench.py [--duration 10] [--connections 50] [--rounds 3]
        [--markdown build/bench/mtls_bench.md]

Needs `wrk`, `haproxy` and `openssl` on PATH; installs nothing. Two meshes side by side on
127.0.7.0/24, each a real `pilot-discovery` (MeshConfig authPolicy NONE, and MUTUAL_TLS) and two
`pilot-agent proxy sidecar` processes (INTERCEPTION_MODE=NONE): a client sidecar whose outbound
listener (15001) routes `Host: bench-server:9080` to the server sidecar's inbound listener
(9080), which forwards to the backend, haproxy answering every request itself with a fixed 200.
The mTLS sidecars read certificates made with istio-ca's own code (ECDSA P-256, SPIFFE ids).

  keep-alive   wrk (--connections, keep-alive) -> client sidecar -> server sidecar -> backend:
               the sidecars' connection is opened once and reused; mTLS vs plaintext req/s
               (target, issue 7: mTLS >= 0.7x plaintext).
  new conn     the same with a DestinationPolicy of httpMaxRequestsPerConnection 1 on the
               service: the client sidecar opens a new connection to the server sidecar for
               every request, so mTLS req/s are the handshakes per second the pair completes;
               the client sidecar offers the session of the previous connection, so they are
               resumed handshakes (the server's counters say how many resumed).
  handshakes   `openssl s_time` (native, one process) against the mTLS server sidecar's port
               with the client's certificate: `-new` (full handshakes) and `-reuse` (resumed),
               each with one request (`-www /`); and the same against `openssl s_server` on the
               same certificate, a native reference for the handshake's own cost.

Paths interleave per round; figures are medians, ratios the median of per-round ratios. The
machine has two cores shared with other work: the other-CPU load seen just before the run is
reported with the figures. Every run is bounded; every process started here is stopped at exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# proxy_bench is a sibling script (tools/bench is not a package): its helpers, shared.
from proxy_bench import (
    BIN,
    HAPROXY_GLOBAL,
    BenchError,
    Procs,
    WrkResult,
    background_busy,
    check_free,
    free_port,
    machine,
    median_run,
    probe,
    wait_port,
    wait_ready,
    wrk,
)

NETWORK = "127.0.7"
BACKEND = (f"{NETWORK}.1", 8080)
REFERENCE = (f"{NETWORK}.2", 9443)  # openssl s_server
SERVICE_PORT = 9080
OUTBOUND = 15001
MODES = {  # mode -> (pilot IP, client sidecar IP, server sidecar IP)
    "plaintext": (f"{NETWORK}.10", f"{NETWORK}.11", f"{NETWORK}.12"),
    "mtls": (f"{NETWORK}.20", f"{NETWORK}.21", f"{NETWORK}.22"),
}
TARGET = 0.7
SPIFFE = "spiffe://cluster.local/ns/default/sa/{}"

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
  - address: {address}
    ports: {{http: {port}}}
    labels: {{app: {name}}}
    serviceAccount: {account}
"""
ONE_REQUEST_PER_CONNECTION = """\
apiVersion: config.istio.io/v1alpha2
kind: DestinationPolicy
metadata: {name: bench-conn}
spec:
  destination: {name: bench-conn}
  circuitBreaker:
    simpleCb: {httpMaxRequestsPerConnection: 1}
"""


@dataclass
class Mesh:
    mode: str
    pilot: str
    client: str
    server: str
    cert_dir: Path


def write_certificates(tmp: Path) -> dict[str, Path]:
    """A root and the two sidecars' certificates, made with istio-ca's code."""
    from istio.ca import pki
    from istio.model.identity import SpiffeId

    now = dt.datetime.now(dt.UTC)
    key = pki.generate_key(pki.KeyType.ECDSA)
    root = pki.make_root(key, org="bench", ttl=dt.timedelta(days=1), now=now)
    signer = pki.SigningMaterial(key, root, (), root)
    dirs = {}
    for name in ("client", "server"):
        workload_key = pki.generate_key(pki.KeyType.ECDSA)
        cert = pki.sign_workload(
            workload_key.public_key(),
            SpiffeId.parse(SPIFFE.format(f"bench-{name}")),
            signer,
            org="bench",
            ttl=dt.timedelta(hours=2),
            now=now,
        )
        directory = tmp / "certs" / name
        directory.mkdir(parents=True)
        (directory / "cert-chain.pem").write_bytes(pki.cert_pem(cert))
        (directory / "key.pem").write_bytes(pki.key_pem(workload_key))
        (directory / "root-cert.pem").write_bytes(pki.cert_pem(root))
        dirs[name] = directory
    return dirs


def start_mesh(procs: Procs, tmp: Path, mode: str, certs: dict[str, Path]) -> Mesh:
    pilot_ip, client_ip, server_ip = MODES[mode]
    base = tmp / mode
    registry, config = base / "registry", base / "config"
    registry.mkdir(parents=True)
    config.mkdir()
    for name in ("bench-server", "bench-conn"):
        (registry / f"{name}.yaml").write_text(
            SERVICE_ENTRY.format(
                name=name, port=SERVICE_PORT, address=server_ip, account="bench-server"
            )
        )
    (config / "bench-conn.yaml").write_text(ONE_REQUEST_PER_CONNECTION)
    mesh_config = base / "mesh.yaml"
    mesh_config.write_text("authPolicy: MUTUAL_TLS\n" if mode == "mtls" else "authPolicy: NONE\n")
    for ip, port in ((pilot_ip, 15010), (client_ip, OUTBOUND), (server_ip, SERVICE_PORT)):
        check_free(ip, port)
    pilot = procs.start(
        f"pilot-{mode}",
        [
            str(BIN / "pilot-discovery"),
            "--registry",
            f"file:{registry}",
            "--config-store",
            f"file://{config}",
            "--grpc-addr",
            f"{pilot_ip}:15010",
            "--http-addr",
            f"{pilot_ip}:{free_port(pilot_ip)}",
            "--mesh-config",
            str(mesh_config),
        ],
    )
    wait_port(pilot, pilot_ip, 15010)
    for role, ip, meta in (
        ("server", server_ip, [f"APP_PORTS={SERVICE_PORT}:{BACKEND[1]}", f"APP_HOST={BACKEND[0]}"]),
        ("client", client_ip, []),
    ):
        argv = [
            str(BIN / "pilot-agent"),
            "proxy",
            "sidecar",
            "--discovery-address",
            f"{pilot_ip}:15010",
            "--bind-address",
            ip,
            "--node-id",
            f"sidecar~{ip}~bench-{role}.default~default.svc.cluster.local",
            "--access-log",
            "off",
            "--log-level",
            "warning",
            "--cert-dir",
            str(certs[role]),
            "--meta",
            "INTERCEPTION_MODE=NONE",
        ]
        for item in meta:
            argv += ["--meta", item]
        procs.start(f"{role}-{mode}", argv)
        wait_ready(ip)
    for host in ("bench-server", "bench-conn"):
        status = probe(client_ip, OUTBOUND, f"{host}:{SERVICE_PORT}")
        if " 200 " not in status + " ":
            raise BenchError(f"{mode}: {host} through the sidecars answered {status!r}")
    return Mesh(mode, pilot_ip, client_ip, server_ip, certs["client"])


def stats(ip: str) -> dict[str, int]:
    """A sidecar's ssl.* counters (admin /stats)."""
    with socket.create_connection((ip, 15000), 5) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    found = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("ssl."):
            name, _, value = line.rpartition(": ")
            found[name] = int(value)
    return found


def s_time(address: tuple[str, int], certs: Path, mode: str, seconds: float) -> float:
    """Connections per second `openssl s_time` completes (each with one GET /)."""
    argv = [
        "openssl",
        "s_time",
        "-connect",
        f"{address[0]}:{address[1]}",
        mode,
        "-www",
        "/",
        "-time",
        str(max(1, round(seconds))),
        "-cert",
        str(certs / "cert-chain.pem"),
        "-key",
        str(certs / "key.pem"),
    ]
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=seconds + 30)
    elapsed = time.monotonic() - began
    out = done.stdout.decode(errors="replace")
    match = re.search(r"(\d+) connections in [\d.]+ real seconds", out)
    if done.returncode != 0 or match is None:
        raise BenchError(f"openssl s_time {mode} failed: {out[-500:]}{done.stderr[-500:]!r}")
    return int(match.group(1)) / elapsed


def reference_server(procs: Procs, certs: Path) -> None:
    """openssl s_server with the server sidecar's certificate, client certificates required."""
    check_free(*REFERENCE)
    proc = procs.start(
        "s_server",
        [
            "openssl",
            "s_server",
            "-accept",
            f"{REFERENCE[0]}:{REFERENCE[1]}",
            "-cert",
            str(certs / "cert-chain.pem"),
            "-key",
            str(certs / "key.pem"),
            "-CAfile",
            str(certs / "root-cert.pem"),
            "-Verify",
            "1",
            "-www",
            "-quiet",
        ],
    )
    wait_port(proc, *REFERENCE)


def run(args: argparse.Namespace) -> str:
    for tool in ("wrk", "haproxy", "openssl"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise BenchError(f"{tool} is not on PATH (Debian: apt-get install -y {tool})")
    busy = background_busy()
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="mtls-bench-") as name:
        tmp = Path(name)
        procs = Procs(tmp)
        try:
            check_free(*BACKEND)
            backend_config = tmp / "backend.cfg"
            backend_config.write_text(
                HAPROXY_GLOBAL + f"frontend backend\n  bind {BACKEND[0]}:{BACKEND[1]}\n"
                "  http-request return status 200 content-type text/plain string ok\n"
            )
            backend = procs.start("backend", ["haproxy", "-f", str(backend_config)])
            wait_port(backend, *BACKEND)
            certs = write_certificates(tmp)
            meshes = {mode: start_mesh(procs, tmp, mode, certs) for mode in MODES}
            reference_server(procs, certs["server"])
            keep: dict[str, list[WrkResult]] = {m: [] for m in MODES}
            fresh: dict[str, list[WrkResult]] = {m: [] for m in MODES}
            handshakes: dict[str, list[float]] = {
                "sidecar -new": [],
                "sidecar -reuse": [],
                "s_server -new": [],
                "s_server -reuse": [],
            }
            before = stats(meshes["mtls"].server)
            for _ in range(args.rounds):
                for mode, mesh in meshes.items():
                    watch = {
                        "client": procs_pid(procs, f"client-{mode}"),
                        "server": procs_pid(procs, f"server-{mode}"),
                    }
                    url = f"http://{mesh.client}:{OUTBOUND}/"
                    wrk(url, 1, args.connections, 1, f"bench-server:{SERVICE_PORT}")  # warm-up
                    keep[mode].append(
                        wrk(
                            url,
                            args.duration,
                            args.connections,
                            1,
                            f"bench-server:{SERVICE_PORT}",
                            watch,
                        )
                    )
                    fresh[mode].append(
                        wrk(
                            url,
                            args.duration,
                            args.connections,
                            1,
                            f"bench-conn:{SERVICE_PORT}",
                            watch,
                        )
                    )
                server = (meshes["mtls"].server, SERVICE_PORT)
                for reuse in ("-new", "-reuse"):
                    handshakes[f"sidecar {reuse}"].append(
                        s_time(server, certs["client"], reuse, args.duration)
                    )
                    handshakes[f"s_server {reuse}"].append(
                        s_time(REFERENCE, certs["client"], reuse, args.duration)
                    )
            after = stats(meshes["mtls"].server)
        finally:
            procs.stop_all()
    return report(args, facts, busy, keep, fresh, handshakes, before, after)


def procs_pid(procs: Procs, name: str) -> int:
    for proc in procs.started:
        if proc.name == name:
            return proc.pid
    raise BenchError(f"no process {name}")


def report(
    args: argparse.Namespace,
    facts: dict[str, str],
    busy: float,
    keep: dict[str, list[WrkResult]],
    fresh: dict[str, list[WrkResult]],
    handshakes: dict[str, list[float]],
    before: dict[str, int],
    after: dict[str, int],
) -> str:
    keep_ratio = statistics.median(
        m.rps / p.rps for m, p in zip(keep["mtls"], keep["plaintext"], strict=True)
    )
    fresh_ratio = statistics.median(
        m.rps / p.rps for m, p in zip(fresh["mtls"], fresh["plaintext"], strict=True)
    )
    rounds = ", ".join(
        f"{m.rps / p.rps:.2f}" for m, p in zip(keep["mtls"], keep["plaintext"], strict=True)
    )

    def delta(suffix: str) -> int:
        return sum(v - before.get(k, 0) for k, v in after.items() if k.endswith(suffix))

    rows = []
    for label, runs in (
        ("keep-alive, plaintext", keep["plaintext"]),
        ("keep-alive, mTLS", keep["mtls"]),
        ("new connection per request, plaintext", fresh["plaintext"]),
        ("new connection per request, mTLS (resumed)", fresh["mtls"]),
    ):
        run = median_run(runs)
        cpu = run.cpu
        rows.append(
            f"| {label} | {run.rps:,.0f} | {run.p50_ms:.2f} | {run.p99_ms:.2f} | "
            f"{cpu['client']:.2f} / {cpu['server']:.2f} | {run.errors or '-'} |"
        )
    shake_rows = [
        f"| {label} | {statistics.median(values):,.0f} |" for label, values in handshakes.items()
    ]
    command = (
        f"tools/bench/mtls_bench.py --duration {args.duration:g} "
        f"--connections {args.connections} --rounds {args.rounds}"
    )
    return "\n".join(
        [
            "## Mutual TLS between sidecars (issue 7)",
            "",
            f"`{command}` on {facts['date']}, {facts['nproc']} cores ({facts['cpu']}), "
            f"Python {facts['python']}, load average {facts['load']}; other work kept "
            f"{busy:.2f} cores busy just before the run (a shared machine: figures are noisy).",
            "",
            "wrk -> client sidecar -> server sidecar -> haproxy (fixed 200), plaintext mesh and "
            "mTLS mesh side by side (authPolicy NONE / MUTUAL_TLS), TLS 1.3, ECDSA P-256.",
            "",
            "| path | req/s | p50 ms | p99 ms | CPU client / server sidecar (cores) | errors |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Keep-alive mTLS / plaintext: **{keep_ratio:.2f}x** (target >= {TARGET}x, "
            f"{'met' if keep_ratio >= TARGET else '**missed**'}; rounds: {rounds}). "
            f"New connection per request, mTLS / plaintext: {fresh_ratio:.2f}x.",
            "",
            f"Server sidecar over the run: {delta('.handshake'):,} handshakes, "
            f"{delta('.session_reused'):,} of them resumed.",
            "",
            "Handshakes per second, `openssl s_time` (each connection one GET /) against the mTLS "
            "server sidecar's port and against `openssl s_server` with the same certificate:",
            "",
            "| server, s_time mode | connections/s |",
            "|---|---|",
            *shake_rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per path")
    parser.add_argument("--markdown", type=Path, help="also write the section here")
    args = parser.parse_args()
    try:
        text = run(args)
    except BenchError as error:
        sys.exit(f"mtls_bench: {error}")
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
