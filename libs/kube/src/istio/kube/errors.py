"""What can go wrong talking to an API server, each error saying which server and why."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from istio.kube.resource import Resource


class KubeError(Exception):
    """Talking to the API server failed; the message names the server and the reason."""


class AccessError(KubeError):
    """No usable way to reach or authenticate to a server: a kubeconfig that is missing or
    wrong, an unreadable token file, bad TLS settings."""


class Unreachable(KubeError):
    """The API server could not be reached (refused, reset, timed out), or a watch stream
    broke off in a way that is worth retrying."""


class ApiError(KubeError):
    """The API server answered with an error; its Status object. `resource` is the kind of
    object the request was about, when a list or watch of one kind failed."""

    def __init__(
        self, code: int, status: Mapping[str, Any], resource: Resource | None = None
    ) -> None:
        self.code = code
        self.reason = str(status.get("reason") or "")
        self.message = str(status.get("message") or f"HTTP {code}")
        details = status.get("details")
        self.details: Mapping[str, Any] = details if isinstance(details, Mapping) else {}
        self.resource = resource
        super().__init__(f"{code} {self.reason}: {self.message}")
