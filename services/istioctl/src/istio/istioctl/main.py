"""istioctl: create, read, replace, delete and validate the mesh's config; make join tokens.

Exit status 0 on success, 1 when the input or the store said no (one precise line per problem
on stderr), 2 for a malformed command line. User input never produces a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

from istio.config import (
    DEFAULT_REGISTRY,
    Config,
    ConfigError,
    Problem,
    parse_documents,
    to_object,
)
from istio.config.duration import parse_duration
from istio.config.parse import dump_yaml
from istio.config.schema import dashed_name
from istio.config.validation import validate_mixer_expressions
from istio.configstore import STORE_ENV, ConfigStore, default_store_url, open_store
from istio.jointokens import JoinTokens, token_directory
from istio.model.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

DEFAULT_PILOT_ADDRESS = "127.0.0.1:15014"
PROXY_ADMIN_PORT = 15000
XDS_TYPES = ("cds", "lds", "eds", "rds")


class UserError(Exception):
    """A problem with what the user asked for; printed as one line per problem."""

    def __init__(self, problems: Sequence[Problem | str]) -> None:
        self.problems = [p if isinstance(p, Problem) else Problem(p) for p in problems]
        super().__init__("\n".join(str(p) for p in self.problems))


def read_configs(files: Sequence[str], namespace: str | None) -> list[Config]:
    """Every object in the files (directories expand to their YAML/JSON files, `-` is stdin).

    All files are parsed before anything is written: any problem anywhere stops the command.
    """
    configs: list[Config] = []
    problems: list[Problem] = []
    for source, text in _read_sources(files, problems):
        parsed, found = parse_documents(text, source, namespace=namespace)
        configs.extend(parsed)
        problems.extend(found)
    if not problems:
        # Mixer rules and instances type-checked against the attributes known offline.
        problems.extend(validate_mixer_expressions(configs))
    seen: dict[tuple[str, str, str], int] = {}
    for config in configs:
        seen[config.key] = seen.get(config.key, 0) + 1
    for key, count in seen.items():
        if count > 1:
            problems.append(
                Problem(
                    f"appears {count} times in the input", kind=key[0], name=f"{key[1]}/{key[2]}"
                )
            )
    if problems:
        raise UserError(problems)
    if not configs:
        raise UserError(["no config objects found in " + ", ".join(files)])
    return configs


def _read_sources(files: Sequence[str], problems: list[Problem]) -> Iterator[tuple[str, str]]:
    for name in files:
        if name == "-":
            yield "<stdin>", sys.stdin.read()
            continue
        path = Path(name)
        paths = (
            sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
            if path.is_dir()
            else [path]
        )
        for item in paths:
            try:
                yield str(item), item.read_text()
            except (OSError, UnicodeDecodeError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else error
                problems.append(Problem(f"cannot read: {reason}", source=str(item)))


def _describe(config: Config) -> str:
    schema = DEFAULT_REGISTRY.by_kind(config.meta.kind)
    assert schema is not None
    return f"{dashed_name(schema.kind)}/{config.meta.namespace}/{config.meta.name}"


async def _apply(
    store: ConfigStore, verb: str, configs: list[Config], out: TextIO
) -> list[Problem]:
    failures: list[Problem] = []
    for config in configs:
        try:
            if verb == "create":
                stored = await store.create(config)
                revision = stored.meta.resource_version
                print(f"Created config {_describe(stored)} at revision {revision}", file=out)
            elif verb == "replace":
                stored = await store.update(config)
                revision = stored.meta.resource_version
                print(f"Updated config {_describe(stored)} to revision {revision}", file=out)
            else:
                meta = config.meta
                await store.delete(meta.kind, meta.name, meta.namespace)
                print(f"Deleted config: {_describe(config)}", file=out)
        except ConfigError as error:
            failures.extend(error.problems)
    return failures


async def run_write(options: argparse.Namespace, out: TextIO) -> None:
    if options.verb == "delete" and options.names:
        configs = await _named_objects(options)
    else:
        if not options.files:
            raise UserError([f"{options.verb} needs -f FILE (or, for delete, KIND NAME...)"])
        configs = read_configs(options.files, options.namespace)
    store = open_store(options.config_store)
    try:
        failures = await _apply(store, options.verb, configs, out)
    finally:
        await store.close()
    if failures:
        raise UserError(failures)


async def _named_objects(options: argparse.Namespace) -> list[Config]:
    kind, *names = options.names
    if not names:
        raise UserError([f"delete {kind} needs at least one NAME"])
    schema = DEFAULT_REGISTRY.resolve(kind)
    from istio.config import ConfigMeta

    namespace = options.namespace or "default"
    return [
        Config(ConfigMeta(schema.kind, schema.api_version, name, namespace), schema.message())
        for name in names
    ]


async def run_get(options: argparse.Namespace, out: TextIO) -> None:
    schema = DEFAULT_REGISTRY.resolve(options.kind)
    namespace = None if options.all_namespaces else (options.namespace or "default")
    store = open_store(options.config_store)
    try:
        if options.name:
            found = await store.get(schema.kind, options.name, namespace or "default")
            if found is None:
                raise UserError(
                    [
                        Problem(
                            "not found",
                            kind=schema.kind,
                            name=f"{namespace or 'default'}/{options.name}",
                        )
                    ]
                )
            configs = [found]
        else:
            configs = await store.list(schema.kind, namespace)
    finally:
        await store.close()
    objects = [to_object(c) for c in configs]
    if options.output == "yaml":
        if objects:
            out.write(dump_yaml(objects))
    elif options.output == "json":
        value: object = objects[0] if options.name else objects
        out.write(json.dumps(value, indent=2) + "\n")
    elif not configs:
        print(f"No resources found in {namespace or 'any'} namespace.", file=sys.stderr)
    else:
        rows = [("NAME", "KIND", "NAMESPACE")] + [
            (c.meta.name, f"{c.meta.kind}.{c.meta.api_version.split('/')[0]}", c.meta.namespace)
            for c in configs
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print(
                "   ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out
            )


def run_proxy_status(options: argparse.Namespace, out: TextIO) -> None:
    statuses = proxy_status(options.pilot_address)
    if options.output == "json":
        out.write(json.dumps(statuses, indent=2) + "\n")
        return
    if not statuses:
        print(f"No proxies connected to Pilot at {options.pilot_address}.", file=sys.stderr)
        return
    rows = [("NAME", *(t.upper() for t in XDS_TYPES))]
    rows += [(s["node"], *(s["types"][t]["state"] for t in XDS_TYPES)) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def proxy_status(pilot_address: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Pilot's /debug/syncz per proxy: node id, sent and acked version per type and its state,
    with the proxy's listener addresses from its admin /config_dump when it answers."""
    syncz = _get_json(f"http://{pilot_address}/debug/syncz", timeout)
    adsz = {s["stream"]: s for s in _get_json(f"http://{pilot_address}/debug/adsz", timeout)}
    statuses = []
    for stream in syncz:
        types = {}
        for name in XDS_TYPES:
            state = stream["types"].get(name) or {}
            sent, acked = state.get("sent_version") or "", state.get("acked_version") or ""
            nack = state.get("last_nack")
            types[name] = {
                "state": "NOT SENT" if not sent else "SYNCED" if acked == sent else "STALE",
                "sent": sent,
                "acked": acked,
                "nack": nack["reason"] if nack else None,
            }
        ip = adsz.get(stream["stream"], {}).get("ip")
        statuses.append(
            {
                "node": stream["node"],
                "types": types,
                "listeners": _listener_addresses(ip, timeout) if ip else None,
            }
        )
    return statuses


def _listener_addresses(ip: str, timeout: float) -> list[str] | None:
    """`name address:port` per listener the proxy at `ip` holds, from its admin port."""
    try:
        dump = _get_json(f"http://{ip}:{PROXY_ADMIN_PORT}/config_dump", min(timeout, 1.0))
    except UserError:
        return None
    found = []
    for config in dump.get("configs", []):
        for entry in config.get("dynamic_listeners", []):
            listener = (entry.get("active_state") or {}).get("listener") or {}
            address = listener.get("address") or {}
            socket = address.get("socketAddress") or address.get("socket_address") or {}
            port = socket.get("portValue", socket.get("port_value", "?"))
            where = f"{socket.get('address', '?')}:{port}"
            found.append(f"{entry.get('name', '?')} {where}")
    return found


def _get_json(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError([f"cannot read {url}: {reason}"]) from error


def run_validate(options: argparse.Namespace, out: TextIO) -> None:
    configs = read_configs(options.files, options.namespace)
    for config in configs:
        print(f"{_describe(config)}: valid", file=out)


def run_token_create(options: argparse.Namespace, out: TextIO) -> None:
    """A one-time join token for a node agent, kept (hashed) where istio-ca looks for it."""
    identity = _token_identity(options)
    try:
        nanos = parse_duration(options.ttl)
    except ValueError as error:
        raise UserError([f"--ttl: {error}"]) from None
    if nanos <= 0:
        raise UserError([f"--ttl: {options.ttl!r} must be positive"])
    directory = token_directory(options.ca_dir, options.token_dir)
    assert directory is not None  # argparse requires one of the two
    try:
        token = JoinTokens(directory).create(identity, nanos / 1e9)
    except OSError as error:
        raise UserError(
            [f"cannot keep a join token in {directory}: {error.strerror or error}"]
        ) from None
    print(token, file=out)
    # On stderr, so that `TOKEN=$(istioctl token create ...)` captures the token alone.
    print(
        f"Created a join token for {identity} in {directory}, usable once within {options.ttl}",
        file=sys.stderr,
    )


def _token_identity(options: argparse.Namespace) -> SpiffeId:
    if options.identity is not None:
        extra = [
            flag
            for flag, value in (
                ("--namespace", options.namespace),
                ("--trust-domain", options.trust_domain),
            )
            if value is not None
        ]
        if extra:
            raise UserError([f"--identity names the whole identity: drop {' and '.join(extra)}"])
        try:
            return SpiffeId.parse(options.identity)
        except ValueError as error:
            raise UserError([f"--identity: {error}"]) from None
    try:
        return SpiffeId.of(
            options.namespace or "default",
            options.service_account,
            options.trust_domain or DEFAULT_TRUST_DOMAIN,
        )
    except ValueError as error:
        raise UserError([str(error)]) from None


def _kinds_help() -> str:
    lines = ["kinds (any of the names):"]
    for schema in DEFAULT_REGISTRY:
        lines.append(f"  {schema.kind:<20} {', '.join(sorted(set(schema.names()[1:])))}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="istioctl",
        description="Manage the mesh's config (Istio 0.2's routing and Mixer kinds).",
    )
    parser.add_argument(
        "--config-store",
        default=None,
        metavar="URL",
        help="file:///dir, etcd://host:port/prefix or kube:// "
        f"(default ${STORE_ENV}, else the local mesh's $MESH_DIR/config)",
    )
    parser.add_argument("-n", "--namespace", default=None, help="namespace (default: default)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for verb, summary in (
        ("create", "create config from files"),
        ("replace", "replace existing config with the files' version"),
        ("delete", "delete the config in files, or KIND NAME..."),
    ):
        command = commands.add_parser(verb, help=summary, description=summary)
        command.add_argument(
            "-f",
            "--file",
            dest="files",
            action="append",
            default=[],
            metavar="FILE",
            help="YAML/JSON file, directory, or - for stdin; repeatable",
        )
        if verb == "delete":
            command.add_argument("names", nargs="*", metavar="KIND NAME", help="kind and names")
        command.set_defaults(verb=verb, names=[] if verb != "delete" else None)

    get = commands.add_parser(
        "get",
        help="show config",
        description="Show config of one kind.",
        epilog=_kinds_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    get.add_argument("kind", help="kind, plural or alias (route-rule, routerules, ...)")
    get.add_argument("name", nargs="?", help="one object's name")
    get.add_argument("-o", "--output", choices=("short", "yaml", "json"), default="short")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")

    validate = commands.add_parser(
        "validate", help="check files without a store", description="Check files offline."
    )
    validate.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="YAML/JSON file, directory, or - for stdin; repeatable",
    )
    status = commands.add_parser(
        "proxy-status",
        help="every proxy's xDS sync state, from Pilot's /debug/syncz",
        description="Every connected proxy and whether it acked what Pilot last sent it, per "
        "type: SYNCED (acked == sent), STALE (sent, not acked yet, or NACKed) or NOT SENT.",
    )
    status.add_argument(
        "--pilot-address",
        default=DEFAULT_PILOT_ADDRESS,
        metavar="H:P",
        help=f"Pilot's --http-addr (default {DEFAULT_PILOT_ADDRESS})",
    )
    status.add_argument("-o", "--output", choices=("short", "json"), default="short")
    _add_token_parser(commands)
    commands.add_parser("version", help="print the version")
    return parser


def _add_token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token",
        help="one-time join tokens for node agents",
        description="One-time join tokens: a node agent presents one to istio-ca to get its "
        "first certificate.",
    )
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser(
        "create",
        help="make a join token for one identity",
        description="Print a new join token for one SPIFFE identity; istio-ca keeps only its "
        "hash and accepts it once, before it expires.",
        epilog="examples:\n"
        "  istioctl token create --identity spiffe://cluster.local/ns/vm/sa/mysql --ca-dir DIR\n"
        "  istioctl token create -n vm --service-account mysql --token-dir DIR --ttl 10m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--identity", metavar="SPIFFE_ID", help="spiffe://TD/ns/NS/sa/SA")
    who.add_argument("--service-account", metavar="SA", help="the identity of SA in -n NAMESPACE")
    # SUPPRESS: not given here, `istioctl -n NS token create ...` still counts.
    create.add_argument(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        help="the service account's namespace (default: default)",
    )
    create.add_argument(
        "--trust-domain",
        default=None,
        metavar="DOMAIN",
        help=f"with --service-account (default {DEFAULT_TRUST_DOMAIN})",
    )
    create.add_argument(
        "--ttl", default="1h", metavar="DURATION", help="how long it may wait to be used (1h)"
    )
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--ca-dir", type=Path, help="istio-ca's --ca-dir: the token goes in DIR/join-tokens"
    )
    where.add_argument("--token-dir", type=Path, help="istio-ca's --token-dir")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    options = build_parser().parse_args(argv)
    if options.config_store is None:
        options.config_store = default_store_url()
    try:
        if options.command in ("create", "replace", "delete"):
            asyncio.run(run_write(options, out))
        elif options.command == "get":
            asyncio.run(run_get(options, out))
        elif options.command == "validate":
            run_validate(options, out)
        elif options.command == "proxy-status":
            run_proxy_status(options, out)
        elif options.command == "token":
            run_token_create(options, out)
        else:
            print(f"istioctl {version('istio-istioctl')}", file=out)
    except (UserError, ConfigError) as error:
        for problem in error.problems:
            print(f"Error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
