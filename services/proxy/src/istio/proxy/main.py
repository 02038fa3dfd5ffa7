"""pilot-agent: the proxy with its agent.

    pilot-agent proxy sidecar|ingress|egress --discovery-address H:P [--node-id ID]
                [--bind-address IP] [--source-address IP] [--admin-port 15000] [--stats-port 15090]
                [--concurrency N] [--meta KEY=VALUE]... [--hosts-file FILE]
                [--access-log PATH|off] [--cert-dir DIR] [--trust-domain TD] [--log-level L]
                [--mixer-reports process|inline]

The node id is `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` from --node-id,
else from INSTANCE_IP (default: the bind address), POD_NAME and POD_NAMESPACE. Node metadata
(INTERCEPTION_MODE, APP_PORTS, APP_HOST, GATEWAY_PORTS, ...) comes from --meta. Exit status 0
after SIGINT/SIGTERM or POST /quitquitquit, 1 when startup fails, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Sequence
from typing import NoReturn
from urllib.parse import urlsplit

from istio.proxy.admin import Answer, Handler
from istio.proxy.admin import serve as serve_admin
from istio.proxy.agent import Agent, Node
from istio.proxy.context import AccessLog, Context, Limits
from istio.proxy.listeners import ListenerManager
from istio.proxy.tls import DEFAULT_CERT_DIR, DEFAULT_TRUST_DOMAIN, TlsManager
from istio.proxy.upstream import Resolver
from istio.proxy.workers import STATS_FD_FLAG, Worker, merged_stats, serve_stats
from istio.proxy.workers import spawn as spawn_workers

PROG = "pilot-agent"
PROXY_TYPES = ("sidecar", "ingress", "egress")
LOG_LEVELS = ("debug", "info", "warning", "error")
WORKER_FLAG = "--worker"

log = logging.getLogger(PROG)


def host_port(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def meta(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog=PROG, description="The mesh's proxy and its agent.")
    commands = root.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="run the proxy")
    proxy.add_argument("type", choices=PROXY_TYPES)
    proxy.add_argument("--discovery-address", type=host_port, required=True, help="Pilot's ADS")
    proxy.add_argument("--node-id", help="the full node id (default: from the environment)")
    proxy.add_argument("--bind-address", default="0.0.0.0", help="where listeners bind")
    proxy.add_argument(
        "--source-address",
        default="",
        metavar="IP",
        help="where upstream connections leave from (Envoy's upstream_bind_config; the local "
        "platform gives each workload's address, so peers and Mixer see who calls)",
    )
    proxy.add_argument("--admin-port", type=int, default=15000)
    proxy.add_argument("--stats-port", type=int, default=15090)
    proxy.add_argument("--concurrency", type=int, default=1, help="worker processes")
    proxy.add_argument("--meta", type=meta, action="append", default=[], help="node metadata")
    proxy.add_argument("--domain", default="", help="default: <namespace>.svc.cluster.local")
    proxy.add_argument(
        "--service-cluster",
        default="istio-proxy",
        help="the service name this proxy's trace spans carry (Envoy's --service-cluster)",
    )
    proxy.add_argument("--hosts-file", default=os.environ.get("MESH_HOSTS_FILE"))
    proxy.add_argument("--access-log", default="/dev/stdout", help="a path, - or off")
    proxy.add_argument(
        "--cert-dir",
        default=DEFAULT_CERT_DIR,
        help="mTLS: cert-chain.pem, key.pem and root-cert.pem, reloaded when they change",
    )
    proxy.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help="mTLS: peers' SPIFFE ids must be in this trust domain",
    )
    proxy.add_argument(
        "--mixer-reports",
        choices=("process", "inline"),
        default="process",
        help="where Mixer Reports are made and sent: a reporter process, on another core "
        "(default), or inline on the proxy's own loop (one process less)",
    )
    proxy.add_argument("--drain-seconds", type=float, default=5.0)
    proxy.add_argument("--request-headers-timeout", type=float, default=10.0)
    proxy.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    proxy.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    proxy.add_argument(STATS_FD_FLAG, type=int, help=argparse.SUPPRESS)
    return root


def node_id(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str:
    """DESIGN §4: `<type>~<ip>~<pod>.<namespace>~<domain>`."""
    if args.node_id:
        return str(args.node_id)
    env = os.environ if environ is None else environ
    ip = env.get("INSTANCE_IP") or (
        args.bind_address if args.bind_address not in ("0.0.0.0", "::") else _local_ip()
    )
    pod = env.get("POD_NAME") or socket.gethostname()
    namespace = env.get("POD_NAMESPACE") or "default"
    domain = args.domain or f"{namespace}.svc.cluster.local"
    return f"{args.type}~{ip}~{pod}.{namespace}~{domain}"


def _local_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _admin_handler(agent: Agent, context: Context, workers: list[Worker]) -> Handler:
    """The agent's admin pages; with workers, /stats and /stats/prometheus sum them all."""

    async def summed(render: str) -> Answer:
        stats = await merged_stats(context.stats, workers)
        if render == "/stats":
            return 200, "text/plain", stats.text()
        return 200, "text/plain; version=0.0.4", stats.prometheus()

    def handler(method: str, target: str) -> Answer | Awaitable[Answer]:
        path = urlsplit(target).path
        if workers and path in ("/stats", "/stats/prometheus"):
            return summed(path)
        return agent.admin(method, target)

    return handler


async def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    worker = bool(args.worker)
    reuse_port = args.concurrency > 1 or worker
    node = Node(node_id(args), dict(args.meta))
    context = Context(
        limits=Limits(
            header_timeout=args.request_headers_timeout, drain_timeout=args.drain_seconds
        ),
        resolver=Resolver.from_file(args.hosts_file),
        access_log=AccessLog.open(args.access_log),
        service_name=args.service_cluster,
        node_id=node.id,
        mixer_reports=args.mixer_reports,
    )
    tls = TlsManager(args.cert_dir, args.trust_domain)
    context.clusters.tls = tls
    context.clusters.source_address = args.source_address
    listeners = ListenerManager(context, args.bind_address, reuse_port=reuse_port, tls=tls)
    agent = Agent(node, args.discovery_address, context, listeners)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, agent.stopped.set)
    servers: list[asyncio.Server] = []
    workers: list[Worker] = []
    side_tasks: list[asyncio.Task[None]] = []
    if args.stats_fd is not None:
        side_tasks.append(loop.create_task(serve_stats(args.stats_fd, context.stats)))
    if not worker:
        admin_host = args.bind_address
        handler = _admin_handler(agent, context, workers)
        try:
            servers = [await serve_admin(admin_host, args.admin_port, handler)]
            if args.stats_port and args.stats_port != args.admin_port:
                servers.append(await serve_admin(admin_host, args.stats_port, handler))
        except OSError as error:
            print(f"{PROG}: cannot serve admin on {admin_host}: {error.strerror}", file=sys.stderr)
            return 1
        workers += await spawn_workers(argv, args.concurrency - 1)
    runner = loop.create_task(agent.run())
    log.info("%s starting: node %s, Pilot at %s", PROG, node.id, args.discovery_address)
    ready = loop.create_task(agent.ready.wait())
    stopped = loop.create_task(agent.stopped.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        log.info("proxy ready: %d listeners bound", len(listeners.bound))
    await stopped
    log.info("shutting down: draining listeners")
    for server in servers:
        server.close()
    for task in side_tasks:
        task.cancel()
    with contextlib.suppress(Exception):  # the last spans, if the collector is there
        await asyncio.wait_for(context.tracer.flush(), 2.0)
    context.tracer.close()
    for child in workers:
        with contextlib.suppress(ProcessLookupError):
            child.process.terminate()
    await listeners.close()
    if context.mixers is not None:  # the Reports still batched, the reporter's too
        with contextlib.suppress(Exception):
            await asyncio.wait_for(context.mixers.close(), 15.0)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    for child in workers:
        await child.process.wait()
        child.close()
    if context.access_log is not None:
        context.access_log.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(arguments)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:  # plain asyncio works, just slower
        sys.exit(asyncio.run(run(args, [a for a in arguments if a != WORKER_FLAG])))
    sys.exit(uvloop.run(run(args, [a for a in arguments if a != WORKER_FLAG])))
