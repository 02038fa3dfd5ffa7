"""stdio: log entries and metrics as lines on stderr, stdout or a file, as JSON
(`output_as_json`) or as tab-separated console lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from istio.expr.types import Value
from istio.mixersdk import AdapterInfo, Env, LogEntryInstance, MetricInstance
from istio.mixersdk.builtin import STDIO
from istio.mixersdk.render import json_value, text


class Stdio:
    def __init__(self, params: dict[str, Any]) -> None:
        self.json = params["output_as_json"]
        self.levels: Mapping[str, str] = params["severity_levels"]
        self.metric_level: str = params["metric_level"]
        self._owned = False
        stream = params["log_stream"]
        if stream == "FILE":
            if not params["output_path"]:
                raise ValueError("log_stream FILE needs output_path")
            self.out: TextIO = open(params["output_path"], "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self.out = sys.stdout if stream == "STDOUT" else sys.stderr

    def _level(self, severity: str) -> str:
        return (
            self.levels.get(severity)
            or self.levels.get(severity.lower())
            or (severity.upper() if severity.upper() in ("INFO", "WARNING", "ERROR") else "INFO")
        )

    def _line(self, level: str, when: datetime, name: str, fields: Mapping[str, Value]) -> str:
        stamp = when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        if self.json:
            record = {"level": level.lower(), "time": stamp, "instance": name}
            record.update((k, json_value(v)) for k, v in sorted(fields.items()))
            return json.dumps(record, separators=(",", ":"))
        pairs = "\t".join(f"{k}={text(v)}" for k, v in sorted(fields.items()))
        return f"{stamp}\t{level.lower()}\t{name}\t{pairs}"

    def handle_log_entry(self, instances: Sequence[LogEntryInstance]) -> None:
        now = datetime.now(UTC)
        lines = [
            self._line(self._level(i.severity), i.timestamp or now, i.name, i.variables)
            for i in instances
        ]
        self._write(lines)

    def handle_metric(self, instances: Sequence[MetricInstance]) -> None:
        now = datetime.now(UTC)
        lines = [
            self._line(self.metric_level, now, i.name, {**i.dimensions, "value": i.value})
            for i in instances
        ]
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    async def close(self) -> None:
        if self._owned:
            self.out.close()


async def build(params: dict[str, Any], env: Env) -> Stdio:
    return Stdio(params)


INFO = AdapterInfo(
    name="stdio",
    description="Log entries and metrics as lines on stderr, stdout or a file (JSON or console)",
    build=build,
    templates=frozenset({"logentry", "metric"}),
    params=STDIO,
)
