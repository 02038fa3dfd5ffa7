"""pilot-discovery: Pilot's command line.

    pilot-discovery --registry file:DIR|kube[:KUBECONFIG]|consul:URL|eureka:URL ...
                    [--config-store URL] [--grpc-addr H:P] [--http-addr H:P]
                    [--mesh-config FILE] [--domain D] [--ingress-certs-dir DIR]
                    [--log-level L]

Exit status 0 after a clean shutdown (SIGINT/SIGTERM), 1 when startup fails (one line on
stderr saying why), 2 for a malformed command line (one line too).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import yaml

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.config import ConfigError
from istio.config.convert import fill_message
from istio.configstore import STORE_ENV, default_store_url, open_store
from istio.model.service import DEFAULT_DOMAIN
from istio.pilot.ingress import KubeIngressSource
from istio.pilot.mesh import default_mesh_config
from istio.pilot.registry import Registry
from istio.pilot.registry.aggregate import AggregateRegistry
from istio.pilot.server import PilotServer, split_host_port
from istio.pilot.xds import tracing
from istio.pilot.xds.gateways import DEFAULT_INGRESS_CERTS_DIR
from istio.pilot.xds.generate import endpoint_changes, generate

PROG = "pilot-discovery"
REGISTRY_KINDS = ("file", "kube", "consul", "eureka")
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger(PROG)


class StartupError(Exception):
    """Pilot cannot start; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class RegistryFlag:
    """One --registry: its kind and argument (a directory, a kubeconfig or a URL)."""

    kind: str
    arg: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def registry_flag(text: str) -> RegistryFlag:
    kind, _, arg = text.partition(":")
    if kind not in REGISTRY_KINDS:
        raise argparse.ArgumentTypeError(
            f"unknown registry {text!r}: use file:DIR, kube[:KUBECONFIG], consul:URL or eureka:URL"
        )
    if kind == "file":
        if arg.startswith("//"):
            arg = urlsplit(f"file:{arg}").path
        if not arg:
            raise argparse.ArgumentTypeError("file registry needs a directory: file:DIR")
    elif kind in ("consul", "eureka"):
        scheme = urlsplit(arg).scheme
        if scheme not in ("http", "https") or not urlsplit(arg).netloc:
            raise argparse.ArgumentTypeError(
                f"{kind} registry needs an http(s) URL: {kind}:http://HOST:PORT (got {arg!r})"
            )
    return RegistryFlag(kind, arg)


def address(text: str) -> str:
    try:
        split_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not the usage block: `pilot-discovery: error: ... (see --help)`."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pilot: service registries and traffic rules to Envoy xDS v3 (ADS).",
    )
    parser.add_argument(
        "--registry",
        dest="registries",
        action="append",
        type=registry_flag,
        default=[],
        metavar="REGISTRY",
        help="file:DIR (ServiceEntry files), kube[:KUBECONFIG], consul:URL or eureka:URL; "
        "repeatable, at least one",
    )
    parser.add_argument(
        "--config-store",
        default=None,
        metavar="URL",
        help="file:///dir, etcd://host:port/prefix or kube:// "
        f"(default ${STORE_ENV}, else the local mesh's $MESH_DIR/config)",
    )
    parser.add_argument(
        "--grpc-addr", type=address, default="127.0.0.1:15010", metavar="H:P", help="xDS (ADS)"
    )
    parser.add_argument(
        "--http-addr",
        type=address,
        default="127.0.0.1:15014",
        metavar="H:P",
        help="/ready, /debug/*, /metrics",
    )
    parser.add_argument(
        "--mesh-config", type=Path, default=None, metavar="FILE", help="MeshConfig YAML"
    )
    parser.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        help=f"the cluster's DNS domain (default {DEFAULT_DOMAIN})",
    )
    parser.add_argument(
        "--ingress-certs-dir",
        default=DEFAULT_INGRESS_CERTS_DIR,
        metavar="DIR",
        help="where the ingress proxy has the TLS secrets IngressRules name: "
        "DIR/SECRET/tls.crt and tls.key (0.2's istio-ingress-certs: DIR/tls.crt; "
        f"default {DEFAULT_INGRESS_CERTS_DIR})",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not options.registries:
        parser.error("at least one --registry is needed")
    if options.config_store is None:
        options.config_store = default_store_url()
    return options


def load_mesh_config(path: Path | None) -> proxy_mesh_pb2.MeshConfig:
    """Istio 0.2's defaults, with the file's fields (YAML, as the `mesh` config map key held)
    set over them."""
    mesh = default_mesh_config()
    if path is None:
        return mesh
    try:
        value = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise StartupError(f"{path}: cannot read the mesh config: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise StartupError(f"{path}: not YAML: {error}".replace("\n", " ")) from None
    problems = fill_message(value, mesh)
    if problems:
        located = [p.located(source=str(path)) for p in problems]
        raise StartupError("; ".join(str(p) for p in located))
    try:
        tracing.validate(mesh)
    except tracing.TracingConfigError as error:
        raise StartupError(f"{path}: {error}") from None
    return mesh


def make_registry(flag: RegistryFlag, domain: str = DEFAULT_DOMAIN) -> Registry:
    """The registry a flag names. Each kind's module is imported only when a flag asks for it,
    so a kind whose dependencies are missing fails only then."""
    try:
        if flag.kind == "file":
            from istio.pilot.registry.serviceentry import ServiceEntryRegistry

            return ServiceEntryRegistry(Path(flag.arg))
        if flag.kind == "kube":
            from istio.pilot.registry.kube import KubeRegistry

            return KubeRegistry(Path(flag.arg) if flag.arg else None, domain=domain)
        if flag.kind == "consul":
            from istio.pilot.registry.consul import ConsulRegistry

            return ConsulRegistry(flag.arg)
        from istio.pilot.registry.eureka import EurekaRegistry

        return EurekaRegistry(flag.arg)
    except ImportError as error:
        raise StartupError(f"registry {flag}: not available in this build ({error})") from None
    except ValueError as error:
        raise StartupError(f"registry {flag}: {error}") from None


def ingress_sources(
    flags: Sequence[RegistryFlag], mesh: proxy_mesh_pb2.MeshConfig
) -> list[KubeIngressSource]:
    """With a Kubernetes registry, that cluster's Ingresses too (0.2's ingress controller),
    unless the mesh's ingressControllerMode is OFF."""
    mode = proxy_mesh_pb2.MeshConfig.IngressControllerMode.Name(mesh.ingress_controller_mode)
    if mode == "OFF":
        return []
    return [
        KubeIngressSource(
            Path(flag.arg) if flag.arg else None,
            mode=mode,
            ingress_class=mesh.ingress_class or "istio",
        )
        for flag in flags
        if flag.kind == "kube"
    ]


async def serve(options: argparse.Namespace) -> None:
    """Run Pilot until SIGINT or SIGTERM."""
    mesh = load_mesh_config(options.mesh_config)
    members = [make_registry(flag, options.domain) for flag in options.registries]
    try:
        aggregate = AggregateRegistry(members)
    except ValueError as error:
        raise StartupError(str(error)) from None
    try:
        store = open_store(options.config_store)
    except ConfigError as error:
        raise StartupError("; ".join(str(p) for p in error.problems)) from None
    pilot = PilotServer(
        aggregate,
        store,
        functools.partial(generate, ingress_certs_dir=options.ingress_certs_dir),
        members=members,
        mesh=mesh,
        endpoint_changes=endpoint_changes,
        config_sources=ingress_sources(options.registries, mesh),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        try:
            await pilot.start(options.grpc_addr, options.http_addr)
        except OSError as error:
            raise StartupError(str(error)) from None
        log.info(
            "serving xDS on %s, HTTP on %s; registries: %s; config store: %s",
            _bound(options.grpc_addr, pilot.grpc_port),
            _bound(options.http_addr, pilot.http_port),
            ", ".join(str(f) for f in options.registries),
            options.config_store,
        )
        await stopping.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await pilot.stop()


def _bound(address: str, port: int) -> str:
    """The address with the port actually bound (port 0 picks one)."""
    host, _ = split_host_port(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(options))
    except StartupError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0
