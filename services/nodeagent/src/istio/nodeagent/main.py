"""node-agent: the command line.

    node-agent --ca-address H:P --identity spiffe://TD/ns/NS/sa/SA --out-dir DIR --root-cert FILE
               [--join-token T | --join-token-file F] [--ca-bootstrap-address H:P] [flags...]

Exit status 0 after SIGINT/SIGTERM, 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from istio.nodeagent.agent import CA_SERVER_NAME, AgentConfig, NodeAgent

PROG = "node-agent"
BOOTSTRAP_PORT = 8061


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Get and rotate this machine's workload certificate.")
    parser.add_argument(
        "--ca-address",
        type=_address,
        required=True,
        metavar="H:P",
        help="the CA's CSR address (renewals with the current certificate)",
    )
    parser.add_argument(
        "--ca-bootstrap-address",
        type=_address,
        metavar="H:P",
        help=f"the CA's join-token address (default: the CA host, port {BOOTSTRAP_PORT})",
    )
    parser.add_argument(
        "--ca-server-name",
        default=CA_SERVER_NAME,
        help="the name the CA's certificate is checked against",
    )
    parser.add_argument("--identity", required=True, metavar="SPIFFE_ID")
    parser.add_argument(
        "--join-token", default="", help="a one-time token from `istioctl token create`"
    )
    parser.add_argument("--join-token-file", type=Path, help="read the join token from this file")
    parser.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        help="where cert-chain.pem, key.pem and root-cert.pem are written",
    )
    parser.add_argument("--root-cert", type=Path, required=True, help="the mesh's root certificate")
    parser.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> tuple[AgentConfig, str]:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not options.identity.startswith("spiffe://"):
        parser.error(f"--identity {options.identity!r} must be spiffe://<td>/ns/<ns>/sa/<sa>")
    token = options.join_token
    if options.join_token_file is not None:
        try:
            token = options.join_token_file.read_text().strip()
        except OSError as error:
            parser.error(f"cannot read --join-token-file: {error.strerror}")
    bootstrap = options.ca_bootstrap_address
    if bootstrap is None:
        host, _, _ = options.ca_address.rpartition(":")
        bootstrap = f"{host}:{BOOTSTRAP_PORT}"
    config = AgentConfig(
        ca_address=options.ca_address,
        bootstrap_address=bootstrap,
        identity=options.identity,
        out_dir=options.out_dir,
        root_cert=options.root_cert,
        join_token=token,
        server_name=options.ca_server_name,
        key_type=options.key_type,
    )
    return config, options.log_level


async def _run(agent: NodeAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await agent.run(stop)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    config, level = parse_config(argv)
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(_run(NodeAgent(config)))
    sys.exit(0)
