"""Per-port authentication policy from a service's annotations: pure functions, no I/O.

Istio 0.2 let a Kubernetes Service override the mesh's authPolicy for one of its ports with
the annotation `auth.istio.io/<port number>: NONE | MUTUAL_TLS` (for a service whose clients
have no sidecar in a MUTUAL_TLS mesh, or one service under mutual TLS in a NONE mesh). Kubernetes
Services and ServiceEntries read it the same way here. A value that is neither policy, or a
port number the service does not have, is reported and ignored: the mesh's policy applies to
that port.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from istio.model import AuthPolicy, Port

AUTH_ANNOTATION_PREFIX = "auth.istio.io/"


def port_auth_policies(
    ports: Sequence[Port], annotations: Mapping[str, str], where: str
) -> tuple[tuple[Port, ...], tuple[str, ...]]:
    """The ports with the policies the annotations give them, and what is wrong with the
    annotations (each naming `where`, e.g. `Service default/reviews`, and the annotation)."""
    policies: dict[int, AuthPolicy] = {}
    problems: list[str] = []
    numbers = {port.port for port in ports}
    for key, value in sorted(annotations.items()):
        if not key.startswith(AUTH_ANNOTATION_PREFIX):
            continue
        suffix = key.removeprefix(AUTH_ANNOTATION_PREFIX)
        if not suffix.isdigit() or int(suffix) not in numbers:
            problems.append(
                f"{where}: annotation {key}: {suffix!r} is not a port of the service "
                f"({', '.join(str(n) for n in sorted(numbers)) or 'it has none'}); ignored"
            )
            continue
        try:
            policies[int(suffix)] = AuthPolicy.parse(value)
        except ValueError:
            problems.append(
                f"{where}: annotation {key}: {value!r} is not NONE or MUTUAL_TLS; "
                "the mesh's authPolicy applies to the port"
            )
    updated = tuple(
        replace(port, auth_policy=policies[port.port]) if port.port in policies else port
        for port in ports
    )
    return updated, tuple(problems)
