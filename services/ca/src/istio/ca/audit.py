"""The CA's audit trail: one JSON line per signing decision, on the logger `istio.ca.audit`
(and so wherever logging goes) and, when given, appended to a file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("istio.ca.audit")

APPROVED = "approved"
DENIED = "denied"
INVALID = "invalid"
RATE_LIMITED = "rate_limited"


class AuditLog:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def record(
        self,
        *,
        caller: str,
        identity: str,
        decision: str,
        reason: str,
        peer: str = "",
        serial: int | None = None,
    ) -> None:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "caller": caller,
            "peer": peer,
            "identity": identity,
            "decision": decision,
            "reason": reason,
        }
        if serial is not None:
            entry["serial"] = f"{serial:x}"
        line = json.dumps(entry, sort_keys=True)
        log.info("%s", line)
        if self.path is not None:
            with self.path.open("a") as out:
                out.write(line + "\n")
