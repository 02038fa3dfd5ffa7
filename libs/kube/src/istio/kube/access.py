"""Where the API server is and who we are, found as kubectl and client-go find them.

A kubeconfig (the named or the current context: server, CA, client certificate, token,
tokenFile, basic auth, insecure-skip-tls-verify, tls-server-name) or, with no kubeconfig at all,
the pod's service account, as client-go's in-cluster config does.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from istio.kube.errors import AccessError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """How to reach one API server and authenticate to it. `source` says where the settings
    came from (a kubeconfig and context, or the service account), for error messages."""

    server: str
    source: str
    token: str = ""
    token_file: Path | None = None
    username: str = ""
    password: str = ""
    ca_file: Path | None = None
    ca_data: str = ""
    client_cert_file: Path | None = None
    client_cert_data: bytes = b""
    client_key_file: Path | None = None
    client_key_data: bytes = b""
    insecure: bool = False
    tls_server_name: str = ""

    def authorization(self) -> str | None:
        """The Authorization header; a token file is read each time, as tokens rotate."""
        if self.token_file is not None:
            try:
                return f"Bearer {self.token_file.read_text().strip()}"
            except OSError as error:
                raise AccessError(
                    f"cannot read the token file {self.token_file} ({self.source}): {error}"
                ) from None
        if self.token:
            return f"Bearer {self.token}"
        if self.username:
            credentials = f"{self.username}:{self.password}".encode()
            return f"Basic {base64.b64encode(credentials).decode()}"
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS settings for an https server; None for plain http."""
        if not self.server.startswith("https://"):
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None, cadata=self.ca_data or None
            )
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.client_cert_file or self.client_cert_data:
                with tempfile.TemporaryDirectory(prefix="kube-client-") as scratch:
                    cert = _as_file(self.client_cert_file, self.client_cert_data, scratch, "cert")
                    key = _as_file(self.client_key_file, self.client_key_data, scratch, "key")
                    if cert is not None:
                        context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise AccessError(
                f"bad TLS settings for {self.server} ({self.source}): {error}"
            ) from None
        return context


def _as_file(path: Path | None, data: bytes, scratch: str, name: str) -> str | None:
    if path is not None:
        return str(path)
    if not data:
        return None
    written = Path(scratch) / name
    written.touch(mode=0o600)
    written.write_bytes(data)
    return str(written)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A named cluster, user or context of a kubeconfig, and the directory its relative paths
    are relative to."""

    value: Mapping[str, Any]
    base: Path


def load_cluster_access(
    kubeconfig: Path | None = None,
    context: str | None = None,
    *,
    service_account_dir: Path | None = None,
) -> ClusterAccess:
    """Access as kubectl would find it: `kubeconfig`, else $KUBECONFIG (a list of files merged,
    the first to name something wins), else ~/.kube/config, else the pod's service account (in
    `service_account_dir`, by default SERVICE_ACCOUNT_DIR). AccessError says what is missing."""
    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise AccessError(f"kubeconfig {kubeconfig} not found")
        return _from_kubeconfigs([kubeconfig], context)
    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        paths = [Path(p) for p in listed.split(os.pathsep) if p and Path(p).is_file()]
        if not paths:
            raise AccessError(f"KUBECONFIG={listed} names no existing file")
        return _from_kubeconfigs(paths, context)
    default = Path.home() / ".kube" / "config"
    if default.is_file():
        return _from_kubeconfigs([default], context)
    if context is not None:
        raise AccessError(f"context {context!r}: no kubeconfig found (KUBECONFIG, {default})")
    return _in_cluster(service_account_dir or SERVICE_ACCOUNT_DIR)


def _in_cluster(account: Path) -> ClusterAccess:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    token = account / "token"
    if not host or not port or not token.is_file():
        raise AccessError(
            "no Kubernetes configuration found: name a kubeconfig, set KUBECONFIG, create "
            "~/.kube/config, or run in a pod with a service account"
        )
    if ":" in host:
        host = f"[{host}]"
    ca = account / "ca.crt"
    return ClusterAccess(
        server=f"https://{host}:{port}",
        source=f"in-cluster service account {account}",
        token_file=token,
        ca_file=ca if ca.is_file() else None,
    )


def _from_kubeconfigs(paths: list[Path], context: str | None) -> ClusterAccess:
    sections: dict[str, dict[str, _Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    current = ""
    for path in paths:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise AccessError(f"cannot read kubeconfig {path}: {error}") from None
        if not isinstance(document, Mapping):
            raise AccessError(f"kubeconfig {path} is not a mapping")
        current = current or str(document.get("current-context") or "")
        for section, entries in sections.items():
            singular = section[:-1]
            for item in document.get(section) or []:
                if isinstance(item, Mapping) and isinstance(item.get(singular), Mapping):
                    entries.setdefault(str(item.get("name")), _Entry(item[singular], path.parent))
    files = ", ".join(str(p) for p in paths)
    name = context or current
    if not name:
        raise AccessError(f"kubeconfig {files} has no current-context: name a context")
    found = sections["contexts"].get(name)
    if found is None:
        known = ", ".join(sorted(sections["contexts"])) or "none"
        raise AccessError(f"kubeconfig {files} has no context {name!r} (contexts: {known})")
    source = f"kubeconfig {files}, context {name}"
    cluster = sections["clusters"].get(str(found.value.get("cluster")))
    if cluster is None or not cluster.value.get("server"):
        raise AccessError(f"{source}: cluster {found.value.get('cluster')!r} has no server")
    user = sections["users"].get(str(found.value.get("user")), _Entry({}, found.base))
    settings, auth = cluster.value, user.value
    if ("exec" in auth or "auth-provider" in auth) and not (
        auth.get("token")
        or auth.get("tokenFile")
        or auth.get("client-certificate-data")
        or auth.get("client-certificate")
    ):
        raise AccessError(
            f"{source}: exec and auth-provider credentials are not supported; use a token"
        )
    return ClusterAccess(
        server=str(settings["server"]).rstrip("/"),
        source=source,
        token=str(auth.get("token") or ""),
        token_file=_path(auth.get("tokenFile"), user.base),
        username=str(auth.get("username") or ""),
        password=str(auth.get("password") or ""),
        ca_file=_path(settings.get("certificate-authority"), cluster.base),
        ca_data=_base64(settings.get("certificate-authority-data"), source).decode(),
        client_cert_file=_path(auth.get("client-certificate"), user.base),
        client_cert_data=_base64(auth.get("client-certificate-data"), source),
        client_key_file=_path(auth.get("client-key"), user.base),
        client_key_data=_base64(auth.get("client-key-data"), source),
        insecure=bool(settings.get("insecure-skip-tls-verify")),
        tls_server_name=str(settings.get("tls-server-name") or ""),
    )


def _path(value: object, base: Path) -> Path | None:
    return base / str(value) if value else None


def _base64(value: object, source: str) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise AccessError(f"{source}: a *-data field is not valid base64") from None
