"""`python -m istio.platform.local up|down`: what `make up` and `make down` run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from istio.platform.local.layout import AUTH_MODES, Layout
from istio.platform.local.mesh import down, parse_hosts, up


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m istio.platform.local",
        description="The mesh with Bookinfo as processes on this machine (no root).",
    )
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument(
        "--mesh-dir",
        type=Path,
        default=Path(os.environ.get("MESH_DIR") or ".mesh"),
        help="state: config/, registry/, logs/, hosts, pids (default $MESH_DIR, else .mesh)",
    )
    parser.add_argument(
        "--network", default="127.0.0", help="the /24 of 127/8 to use (default 127.0.0)"
    )
    parser.add_argument("--ingress-port", type=int, default=8080)
    parser.add_argument("--pilot-grpc-port", type=int, default=15010)
    parser.add_argument("--pilot-http-port", type=int, default=15014)
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME=IP",
        help="add NAME to the proxies' hosts file; repeatable",
    )
    parser.add_argument(
        "--zipkin-address",
        default=os.environ.get("ZIPKIN_ADDRESS", ""),
        metavar="HOST:PORT",
        help="a Zipkin collector: every proxy sends it spans (default $ZIPKIN_ADDRESS; off)",
    )
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="none",
        help="none: plaintext between proxies (0.2's default); mtls: istio-ca, a node agent "
        "per proxy and mutual TLS only; permissive: mutual TLS, plaintext accepted too",
    )
    args = parser.parse_args(argv)
    try:
        layout = Layout(
            args.mesh_dir,
            args.network,
            args.pilot_grpc_port,
            args.pilot_http_port,
            args.ingress_port,
            parse_hosts(args.host),
            zipkin_address=args.zipkin_address,
            auth=args.auth,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.command == "down":
        return down(layout)
    return asyncio.run(up(layout))


if __name__ == "__main__":
    sys.exit(main())
