"""Where the CA's signing key and certificate live, so that a restart keeps the same root.

- a directory (`--ca-dir`): ca-cert.pem and ca-key.pem (mode 0600), made on first start;
- the Kubernetes secret `istio-ca-secret` in the Istio namespace (keys ca-cert.pem, ca-key.pem),
  made on first start; when two CAs race to make it, the loser uses the winner's;
- brought by the user (`--cacerts-dir`, the `cacerts` layout): ca-cert.pem and ca-key.pem sign,
  cert-chain.pem leads from ca-cert.pem to root-cert.pem, and all of it is checked at start.

A key file that the group or others may read is refused, as ssh refuses such a key: the CA
does not start, and says which file and what to do.
"""

from __future__ import annotations

import base64
import datetime
import os
import stat
from pathlib import Path
from typing import Any

from istio.ca import pki
from istio.ca.pki import ChainError, KeyType, SigningMaterial
from istio.kube import ApiError, KubeClient, Resource

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
CA_SECRET = "istio-ca-secret"
CA_SECRET_TYPE = "istio.io/ca-root"
SECRETS = Resource("", "v1", "secrets")


class StorageError(Exception):
    """The CA's key material cannot be used; the message says which and why, in one line."""


def check_key_file(path: Path) -> None:
    """StorageError unless `path` is a regular file only its owner can read or write."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise StorageError(f"{path}: cannot read the CA key ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise StorageError(f"{path}: the CA key must be a regular file")
    if mode & 0o077:
        raise StorageError(
            f"{path}: the CA key is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"refusing to start: run `chmod 600 {path}`"
        )


def write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner alone (never, even for a moment, by others)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise StorageError(f"{path}: cannot read ({error.strerror})") from None


def load_or_create_in_directory(
    directory: Path,
    *,
    key_type: KeyType,
    org: str,
    root_ttl: datetime.timedelta,
    now: datetime.datetime,
) -> tuple[SigningMaterial, bool]:
    """The self-signed root kept in `directory`, made there when absent; and whether it was
    made now."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        check_key_file(key_path)
        try:
            key = pki.load_key(_read(key_path), str(key_path))
            certs = pki.load_certs(_read(cert_path), str(cert_path))
            if len(certs) != 1:
                raise ChainError(f"{cert_path}: expected one certificate, found {len(certs)}")
            material = pki.check_signing_material(key, certs[0], [], certs[0], now=now)
        except ChainError as error:
            raise StorageError(f"{directory}: {error}") from None
        return material, False
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(
            f"{directory}: cannot create the CA directory ({error.strerror})"
        ) from None
    key = pki.generate_key(key_type)
    root = pki.make_root(key, org=org, ttl=root_ttl, now=now)
    write_private(key_path, pki.key_pem(key))
    cert_path.write_bytes(pki.cert_pem(root))
    return SigningMaterial(key, root, (), root), True


def load_cacerts(directory: Path, *, now: datetime.datetime) -> SigningMaterial:
    """Signing material brought by the user in the `cacerts` layout, checked."""
    key_path = directory / CA_KEY
    check_key_file(key_path)
    try:
        key = pki.load_key(_read(key_path), str(key_path))
        certs = pki.load_certs(_read(directory / CA_CERT), str(directory / CA_CERT))
        roots = pki.load_certs(_read(directory / ROOT_CERT), str(directory / ROOT_CERT))
        chain = pki.load_certs(_read(directory / CERT_CHAIN), str(directory / CERT_CHAIN))
        if len(certs) != 1 or len(roots) != 1:
            raise ChainError(f"{CA_CERT} and {ROOT_CERT} must hold one certificate each")
        return pki.check_signing_material(key, certs[0], chain, roots[0], now=now)
    except ChainError as error:
        raise StorageError(f"{directory}: {error}") from None


async def load_or_create_in_secret(
    client: KubeClient,
    namespace: str,
    *,
    key_type: KeyType,
    org: str,
    root_ttl: datetime.timedelta,
    now: datetime.datetime,
) -> tuple[SigningMaterial, bool]:
    """The self-signed root kept in the secret `istio-ca-secret`, made when absent."""
    path = SECRETS.item(namespace, CA_SECRET)
    try:
        return _from_secret(await client.request("GET", path), namespace), False
    except ApiError as error:
        if error.code != 404:
            raise StorageError(f"secret {namespace}/{CA_SECRET}: {error}") from None
    key = pki.generate_key(key_type)
    root = pki.make_root(key, org=org, ttl=root_ttl, now=now)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET, "namespace": namespace},
        "type": CA_SECRET_TYPE,
        "data": {
            CA_CERT: base64.b64encode(pki.cert_pem(root)).decode(),
            CA_KEY: base64.b64encode(pki.key_pem(key)).decode(),
        },
    }
    try:
        await client.request("POST", SECRETS.collection(namespace), secret)
    except ApiError as error:
        if error.code != 409:
            raise StorageError(f"cannot create secret {namespace}/{CA_SECRET}: {error}") from None
        return _from_secret(await client.request("GET", path), namespace), False
    return SigningMaterial(key, root, (), root), True


def _from_secret(secret: dict[str, Any], namespace: str) -> SigningMaterial:
    where = f"secret {namespace}/{CA_SECRET}"
    data = secret.get("data") or {}
    try:
        key = pki.load_key(base64.b64decode(data[CA_KEY]), f"{where} key {CA_KEY}")
        certs = pki.load_certs(base64.b64decode(data[CA_CERT]), f"{where} key {CA_CERT}")
        if len(certs) != 1:
            raise ChainError(f"{where} key {CA_CERT}: expected one certificate")
        now = datetime.datetime.now(datetime.UTC)
        return pki.check_signing_material(key, certs[0], [], certs[0], now=now)
    except KeyError as missing:
        raise StorageError(f"{where} has no {missing} key") from None
    except (ValueError, TypeError) as error:
        raise StorageError(f"{where}: {error}") from None
