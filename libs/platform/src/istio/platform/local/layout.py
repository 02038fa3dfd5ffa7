"""Where everything of the local platform lives: addresses, ports and files under $MESH_DIR.

Pure apart from the small file writers at the end. Every workload gets its own loopback address
in one /24 of 127/8 (`network`, default 127.0.0): Pilot and the ingress gateway take .1, the
Bookinfo workloads .2 upwards, so a sidecar binds the usual ports on its workload's address as
it would in a pod.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "default"
DOMAIN = f"{NAMESPACE}.svc.cluster.local"
SERVICE_PORT = 9080
APP_PORT = 19080
OUTBOUND_PORT = 15001
ADMIN_PORT = 15000
STATS_PORT = 15090
CA_GRPC_PORT = 8060  # HandleCSR for callers with a certificate (renewals)
CA_BOOTSTRAP_PORT = 8061  # HandleCSR for callers with a join token (first certificates)
MIXER_GRPC_PORT = 9091  # Mixer's Check and Report (0.2's istio-mixer ports)
MIXER_MONITORING_PORT = 9093  # its /metrics and /healthz
MIXER_PROMETHEUS_PORT = 42422  # the Prometheus adapter's /metrics: the mesh's request metrics
TRUST_DOMAIN = "cluster.local"
# How the mesh's proxies talk to each other (`make up AUTH=...`): plaintext, as 0.2's default
# MeshConfig (authPolicy NONE); mutual TLS only; or mutual TLS and plaintext on each port.
AUTH_MODES = ("none", "mtls", "permissive")
INGRESS_SERVICE_ACCOUNT = "istio-ingress-service-account"

# Bookinfo's workloads, in start order (the apps' contract: `python -m istio.bookinfo SERVICE
# --version vN --host HOST --port PORT`).
BOOKINFO: tuple[tuple[str, str], ...] = (
    ("productpage", "v1"),
    ("details", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
)

# 0.2's Bookinfo Ingress: these paths on the gateway go to productpage:9080.
INGRESS_PATHS: tuple[tuple[str, str, str], ...] = (
    ("productpage", "exact", "/productpage"),
    ("login", "exact", "/login"),
    ("logout", "exact", "/logout"),
    ("static", "prefix", "/static"),
    ("api", "prefix", "/api/v1/products"),
)


@dataclass(frozen=True)
class Workload:
    """One Bookinfo workload: the app and its sidecar on one loopback address (a pod)."""

    app: str
    version: str
    ip: str
    app_port: int = APP_PORT
    service_port: int = SERVICE_PORT

    @property
    def name(self) -> str:
        return f"{self.app}-{self.version}"

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.name}.{NAMESPACE}~{DOMAIN}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.ip}:{OUTBOUND_PORT}"

    @property
    def service_account(self) -> str:
        """Bookinfo's service accounts, as its Kubernetes manifests name them."""
        return f"bookinfo-{self.app}" if self.app in BOOKINFO_APPS else self.app

    @property
    def identity(self) -> str:
        return spiffe_id(NAMESPACE, self.service_account)


BOOKINFO_APPS = frozenset(app for app, _ in BOOKINFO)


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Layout:
    mesh_dir: Path
    network: str = "127.0.0"
    pilot_grpc_port: int = 15010
    pilot_http_port: int = 15014
    ingress_port: int = 8080
    extra_hosts: Mapping[str, str] = field(default_factory=dict)
    # host:port of a Zipkin collector: tracing on (every request sampled), else off
    zipkin_address: str = ""
    auth: str = "none"  # one of AUTH_MODES

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        parts = self.network.split(".")
        if (
            len(parts) != 3
            or parts[0] != "127"
            or not all(p.isdigit() and int(p) < 256 for p in parts)
        ):
            raise ValueError(
                f"network must be a /24 of 127/8 such as 127.0.0, got {self.network!r}"
            )

    # Addresses.

    @property
    def pilot_ip(self) -> str:
        return f"{self.network}.1"

    @property
    def ingress_ip(self) -> str:
        return f"{self.network}.1"

    @property
    def pilot_grpc(self) -> str:
        return f"{self.pilot_ip}:{self.pilot_grpc_port}"

    @property
    def pilot_http(self) -> str:
        return f"{self.pilot_ip}:{self.pilot_http_port}"

    @property
    def mtls(self) -> bool:
        return self.auth != "none"

    @property
    def mixer_ip(self) -> str:
        return f"{self.network}.1"

    @property
    def mixer_address(self) -> str:
        return f"{self.mixer_ip}:{MIXER_GRPC_PORT}"

    @property
    def mixer_metrics_url(self) -> str:
        """The Prometheus adapter's metrics: request_count and the rest of 0.2's telemetry."""
        return f"http://{self.mixer_ip}:{MIXER_PROMETHEUS_PORT}/metrics"

    @property
    def ca_ip(self) -> str:
        return f"{self.network}.1"

    @property
    def ca_grpc(self) -> str:
        return f"{self.ca_ip}:{CA_GRPC_PORT}"

    @property
    def ca_bootstrap(self) -> str:
        return f"{self.ca_ip}:{CA_BOOTSTRAP_PORT}"

    @property
    def ingress_identity(self) -> str:
        return spiffe_id("istio-system", INGRESS_SERVICE_ACCOUNT)

    @property
    def ingress_url(self) -> str:
        return f"http://{self.ingress_ip}:{self.ingress_port}"

    @property
    def ingress_node_id(self) -> str:
        return (
            f"ingress~{self.ingress_ip}~istio-ingress.istio-system~istio-system.svc.cluster.local"
        )

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(
            Workload(app, version, f"{self.network}.{index + 2}")
            for index, (app, version) in enumerate(BOOKINFO)
        )

    def listen_addresses(self) -> list[tuple[str, int, str]]:
        """Every (ip, port) some process will bind, with who binds it."""
        found = [
            (self.pilot_ip, self.pilot_grpc_port, "pilot-discovery xDS"),
            (self.pilot_ip, self.pilot_http_port, "pilot-discovery debug"),
            (self.ingress_ip, self.ingress_port, "ingress gateway"),
            (self.ingress_ip, ADMIN_PORT, "ingress gateway admin"),
            (self.ingress_ip, STATS_PORT, "ingress gateway stats"),
            (self.mixer_ip, MIXER_GRPC_PORT, "mixs Check and Report"),
            (self.mixer_ip, MIXER_MONITORING_PORT, "mixs monitoring"),
            (self.mixer_ip, MIXER_PROMETHEUS_PORT, "mixs Prometheus adapter"),
        ]
        if self.mtls:
            found += [
                (self.ca_ip, CA_GRPC_PORT, "istio-ca HandleCSR"),
                (self.ca_ip, CA_BOOTSTRAP_PORT, "istio-ca HandleCSR with join tokens"),
            ]
        for w in self.workloads:
            found += [
                (w.ip, w.app_port, f"{w.name} app"),
                (w.ip, w.service_port, f"{w.name} sidecar inbound"),
                (w.ip, OUTBOUND_PORT, f"{w.name} sidecar outbound"),
                (w.ip, ADMIN_PORT, f"{w.name} sidecar admin"),
                (w.ip, STATS_PORT, f"{w.name} sidecar stats"),
            ]
        return found

    # Files.

    @property
    def config_dir(self) -> Path:
        return self.mesh_dir / "config"

    @property
    def config_store_url(self) -> str:
        return f"file://{self.config_dir.resolve()}"

    @property
    def registry_dir(self) -> Path:
        return self.mesh_dir / "registry"

    @property
    def logs_dir(self) -> Path:
        return self.mesh_dir / "logs"

    @property
    def ca_dir(self) -> Path:
        """istio-ca's --ca-dir: the root (ca-cert.pem, ca-key.pem) and join tokens."""
        return self.mesh_dir / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "ca-cert.pem"

    def cert_dir(self, name: str) -> Path:
        """Where a proxy's node agent writes cert-chain.pem, key.pem, root-cert.pem."""
        return self.mesh_dir / "certs" / name

    @property
    def hosts_file(self) -> Path:
        return self.mesh_dir / "hosts"

    @property
    def mesh_config_file(self) -> Path:
        """The MeshConfig Pilot reads (`--mesh-config`), rewritten at every start."""
        return self.mesh_dir / "mesh.yaml"

    def mesh_config(self) -> dict[str, Any]:
        """MeshConfig fields, as the `mesh` config map held them in 0.2."""
        config: dict[str, Any] = {"mixerAddress": self.mixer_address}
        if self.mtls:
            config["authPolicy"] = "MUTUAL_TLS"
            config["mtlsPermissive"] = self.auth == "permissive"
        if self.zipkin_address:
            config["enableTracing"] = True
            config["defaultConfig"] = {"zipkinAddress": self.zipkin_address}
        return config

    @property
    def pid_file(self) -> Path:
        return self.mesh_dir / "pids"


def service_entry(app: str, endpoints: Iterable[Workload]) -> dict[str, Any]:
    """The ServiceEntry the platform writes for one Bookinfo service: one endpoint per live
    workload, at its address and the service port (its sidecar's inbound listener)."""
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "ServiceEntry",
        "metadata": {"name": app, "namespace": NAMESPACE},
        "spec": {
            "hosts": [f"{app}.{DOMAIN}"],
            "ports": [{"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "location": "MESH_INTERNAL",
            "endpoints": [
                {
                    "address": w.ip,
                    "ports": {"http": w.service_port},
                    "labels": {"app": w.app, "version": w.version},
                    "serviceAccount": w.service_account,
                }
                for w in endpoints
            ],
        },
    }


def ingress_rules() -> list[dict[str, Any]]:
    """0.2's Bookinfo Ingress as IngressRules on port 8080 (the gateway's port is the rule's)."""
    return [
        {
            "apiVersion": "config.istio.io/v1alpha2",
            "kind": "IngressRule",
            "metadata": {"name": f"bookinfo-{name}", "namespace": NAMESPACE},
            "spec": {
                "port": 0,  # filled in by the caller
                "match": {"request": {"headers": {"uri": {kind: path}}}},
                "destination": {"name": "productpage"},
                "destinationPort": SERVICE_PORT,
            },
        }
        for name, kind, path in INGRESS_PATHS
    ]


def write_atomically(path: Path, text: str) -> None:
    """Readers (Pilot's file watcher) never see a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_registry(layout: Layout, alive: Iterable[Workload]) -> None:
    """One ServiceEntry file per Bookinfo service with the live workloads as endpoints. Other
    files in the directory (VMs a user adds) are left alone."""
    layout.registry_dir.mkdir(parents=True, exist_ok=True)
    live = list(alive)
    for app in dict.fromkeys(app for app, _ in BOOKINFO):
        entry = service_entry(app, [w for w in live if w.app == app])
        header = "# Written by the local platform (make up): the live workloads of this service.\n"
        write_atomically(
            layout.registry_dir / f"{app}.yaml", header + yaml.safe_dump(entry, sort_keys=False)
        )


HOSTS_HEADER = """\
# Names the mesh's proxies resolve before DNS, as /etc/hosts: `ADDRESS NAME...`.
# Proxies read this file when they start: restart the mesh after editing it.
"""


def write_hosts(layout: Layout) -> None:
    """Keep the user's lines; add or replace a line per extra host the caller names."""
    path = layout.hosts_file
    lines = path.read_text().splitlines() if path.exists() else HOSTS_HEADER.splitlines()
    names = {name.lower() for name in layout.extra_hosts}
    kept = [
        line for line in lines if not names & {n.lower() for n in line.split("#", 1)[0].split()[1:]}
    ]
    kept += [f"{address} {name}" for name, address in sorted(layout.extra_hosts.items())]
    write_atomically(path, "\n".join(kept) + "\n")
