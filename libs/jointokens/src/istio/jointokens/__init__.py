"""One-time join tokens: how a machine with no certificate yet proves who it may become.

`istioctl token create` (or `istio-ca token create`) prints a random token and keeps only its
SHA-256 (one file per token, mode 0600, named by the hash, holding the identity and the expiry),
so reading the token directory does not give away tokens. Spending a token removes its file; the
removal is what makes it single-use, and it is atomic even with several CA processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from istio.model.identity import SpiffeId

# Where the CA looks for tokens when given only --ca-dir.
TOKEN_DIR = "join-tokens"


def token_directory(ca_dir: Path | None, token_dir: Path | None) -> Path | None:
    """Where tokens are kept: --token-dir if given, else CA_DIR/join-tokens, else unknown.

    istio-ca and istioctl both resolve their flags with this, so a token made with the same flags
    the CA was started with lands where the CA will look for it."""
    if token_dir is not None:
        return token_dir
    return ca_dir / TOKEN_DIR if ca_dir is not None else None


@dataclass(frozen=True, slots=True)
class Spent:
    """The outcome of presenting a token: the identity it grants, or why it grants none."""

    identity: SpiffeId | None
    reason: str


class JoinTokens:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def create(self, identity: SpiffeId, ttl_seconds: float, *, now: float | None = None) -> str:
        """A new token for `identity`, good for `ttl_seconds`; OSError when it cannot be kept."""
        if ttl_seconds <= 0:
            raise ValueError(f"a join token's lifetime must be positive, not {ttl_seconds}s")
        token = secrets.token_urlsafe(32)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        expires = (time.time() if now is None else now) + ttl_seconds
        record = json.dumps({"identity": str(identity), "expires": expires}).encode()
        fd = os.open(self._path(token), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(record)
        return token

    def spend(self, token: str, *, now: float | None = None) -> Spent:
        """The identity a token grants, spending it; or none, with the reason."""
        if not token:
            return Spent(None, "no join token presented")
        path = self._path(token)
        try:
            record = json.loads(path.read_bytes())
            path.unlink()
        except FileNotFoundError:
            return Spent(None, "unknown or already used join token")
        except (OSError, ValueError) as error:
            return Spent(None, f"unreadable join token record ({type(error).__name__})")
        if not isinstance(record, dict):
            return Spent(None, "unreadable join token record (not an object)")
        if (time.time() if now is None else now) > float(record.get("expires", 0)):
            return Spent(None, "expired join token")
        try:
            return Spent(SpiffeId.parse(str(record.get("identity"))), "")
        except ValueError as error:
            return Spent(None, f"join token record: {error}")

    def _path(self, token: str) -> Path:
        return self.directory / hashlib.sha256(token.encode()).hexdigest()
