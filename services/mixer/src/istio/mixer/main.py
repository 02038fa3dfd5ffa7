"""mixs: Mixer's command line.

    mixs server [--config-store URL] [--config-default-namespace NS] [--grpc-addr H:P]
                [--monitoring-addr H:P] [--prometheus-addr H:P] [--adapter-timeout S]
                [--check-valid-duration D] [--log-level L]
    mixs validate -f FILE... [--config-default-namespace NS]
    mixs adapters
    mixs build --adapter PATH... --out DIR [--workspace ROOT]

Exit status 0 after a clean shutdown (SIGINT/SIGTERM) or a valid check, 1 when startup or the
check fails (one line per problem on stderr), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import uvloop
from prometheus_client import CollectorRegistry

from istio.config import ConfigError, Problem, parse_documents
from istio.configstore import STORE_ENV, default_store_url, open_store
from istio.expr import parse_duration
from istio.mixer.build import BuildError
from istio.mixer.build import build as build_mixer
from istio.mixer.config import DEFAULT_CONFIG_NAMESPACE, build_plan
from istio.mixer.metrics import MixerMetrics
from istio.mixer.runtime import Runtime
from istio.mixer.server import MixerServer, mixer_registry, split_host_port
from istio.mixersdk import AdapterInfo, discover

PROG = "mixs"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger(PROG)


class StartupError(Exception):
    """Mixer cannot start; the message says why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _address(text: str) -> str:
    try:
        split_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _seconds(text: str) -> float:
    try:
        value = parse_duration(text).total_seconds()
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 500ms") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mixer: policy checks, quotas and telemetry.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    server = commands.add_parser("server", help="run Mixer", description="Run Mixer.")
    server.add_argument(
        "--config-store",
        default=None,
        metavar="URL",
        help="file:///dir, etcd://host:port/prefix or kube:// "
        f"(default ${STORE_ENV}, else the local mesh's $MESH_DIR/config)",
    )
    server.add_argument(
        "--config-default-namespace",
        default=DEFAULT_CONFIG_NAMESPACE,
        metavar="NS",
        help=f"rules here apply to every request (default {DEFAULT_CONFIG_NAMESPACE})",
    )
    server.add_argument("--grpc-addr", type=_address, default="127.0.0.1:9091", metavar="H:P")
    server.add_argument(
        "--monitoring-addr",
        type=_address,
        default="127.0.0.1:9093",
        metavar="H:P",
        help="/metrics, /healthz, /debug/configz",
    )
    server.add_argument(
        "--prometheus-addr",
        type=_address,
        default="127.0.0.1:42422",
        metavar="H:P",
        help="the prometheus adapter's /metrics",
    )
    server.add_argument(
        "--adapter-timeout",
        type=_seconds,
        default=1.0,
        metavar="DURATION",
        help="how long a handler may take before its call fails (default 1s)",
    )
    server.add_argument(
        "--check-valid-duration",
        type=_seconds,
        default=10.0,
        metavar="DURATION",
        help="the longest a client may reuse a Check answer, so that a policy change is in "
        "force within it (default 10s)",
    )
    server.add_argument("--log-level", choices=LOG_LEVELS, default="info")

    validate = commands.add_parser(
        "validate",
        help="check Mixer config files offline, as the server would load them",
        description="Check files as `mixs server` would: every object, every expression "
        "against the attribute manifests, every reference, with the installed adapters.",
    )
    validate.add_argument(
        "-f", "--file", dest="files", action="append", required=True, metavar="FILE"
    )
    validate.add_argument(
        "--config-default-namespace", default=DEFAULT_CONFIG_NAMESPACE, metavar="NS"
    )
    commands.add_parser("adapters", help="list the installed adapters")
    build = commands.add_parser(
        "build",
        help="build a Mixer that includes custom adapters",
        description="Build wheels for Mixer and the adapter projects into OUT/wheels, and a "
        "virtualenv OUT/venv whose bin/mixs is the custom Mixer.",
    )
    build.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="an adapter project's directory (its pyproject.toml declares the adapter in the "
        "entry point group istio.mixer.adapters); repeatable",
    )
    build.add_argument("--out", type=Path, required=True, metavar="DIR")
    build.add_argument(
        "--workspace",
        type=Path,
        default=None,
        metavar="ROOT",
        help="the mesh's source tree (default: the one this Mixer runs from)",
    )
    return parser


def load_adapters() -> dict[str, AdapterInfo]:
    adapters, problems = discover()
    for problem in problems:
        log.warning("adapter left out: %s", problem)
    return adapters


async def serve(options: argparse.Namespace) -> None:
    adapters = load_adapters()
    registry, problems = mixer_registry(adapters)
    for problem in problems:
        log.warning("%s", problem)
    try:
        store = open_store(options.config_store, registry=registry)
    except ConfigError as error:
        raise StartupError("; ".join(str(p) for p in error.problems)) from None
    metrics = MixerMetrics(CollectorRegistry())
    runtime = Runtime(
        adapters,
        metrics,
        default_namespace=options.config_default_namespace,
        adapter_timeout=options.adapter_timeout,
        max_valid_duration=timedelta(seconds=options.check_valid_duration),
        prometheus_registry=CollectorRegistry(),
    )
    server = MixerServer(runtime, store, metrics)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        try:
            await server.start(options.grpc_addr, options.monitoring_addr, options.prometheus_addr)
        except OSError as error:
            raise StartupError(str(error)) from None
        # What startup made (modules, protobuf descriptors, the adapters) lives as long as the
        # process: out of the collector's way, so that per-request garbage is cheap to collect.
        gc.freeze()
        log.info(
            "serving the Mixer API on port %d, monitoring on %d, Prometheus adapter on %d; "
            "adapters: %s; config store: %s",
            server.grpc_port,
            server.monitoring_port,
            server.prometheus_port,
            ", ".join(sorted(adapters)),
            options.config_store,
        )
        await stopping.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.stop()


def validate(
    files: Sequence[str], default_namespace: str, adapters: Mapping[str, AdapterInfo]
) -> list[Problem]:
    registry, _ = mixer_registry(adapters)
    configs = []
    problems: list[Problem] = []
    for name in files:
        path = Path(name)
        paths = (
            sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
            if path.is_dir()
            else [path]
        )
        for item in paths:
            try:
                text = item.read_text()
            except OSError as error:
                problems.append(Problem(f"cannot read: {error.strerror}", source=str(item)))
                continue
            parsed, found = parse_documents(text, str(item), registry=registry)
            configs.extend(parsed)
            problems.extend(found)
    if not problems:
        _, problems = build_plan(configs, adapters, default_namespace=default_namespace)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.command == "adapters":
        for name, info in sorted(load_adapters().items()):
            templates = ", ".join(sorted(info.templates)) or "attribute producer"
            print(f"{name:<14} {templates:<48} {info.description}")
        return 0
    if options.command == "build":
        try:
            mixs = build_mixer(options.adapters, options.out, options.workspace)
        except BuildError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1
        print(f"built {mixs} (wheels in {options.out / 'wheels'})")
        return 0
    if options.command == "validate":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        problems = validate(options.files, options.config_default_namespace, load_adapters())
        for problem in problems:
            print(f"Error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if options.config_store is None:
        options.config_store = default_store_url()
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        # uvloop: grpc.aio's callbacks, tasks and futures cost less per call than on asyncio's
        # own loop (tools/bench/mixer_bench.py measures both).
        uvloop.run(serve(options))
    except StartupError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0
