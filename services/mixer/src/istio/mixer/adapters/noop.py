"""noop: accepts every template and does nothing (checks pass, quotas are granted)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from istio.mixersdk import (
    AdapterInfo,
    CheckNothingInstance,
    CheckResult,
    Env,
    ListEntryInstance,
    LogEntryInstance,
    MetricInstance,
    QuotaArgs,
    QuotaInstance,
    QuotaResult,
    ReportNothingInstance,
)

_OK = CheckResult()


class Noop:
    def handle_check_nothing(self, instance: CheckNothingInstance) -> CheckResult:
        return _OK

    def handle_list_entry(self, instance: ListEntryInstance) -> CheckResult:
        return _OK

    def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        return QuotaResult(args.amount, _OK.valid_duration)

    def handle_metric(self, instances: Sequence[MetricInstance]) -> None:
        return None

    def handle_log_entry(self, instances: Sequence[LogEntryInstance]) -> None:
        return None

    def handle_report_nothing(self, instances: Sequence[ReportNothingInstance]) -> None:
        return None

    async def close(self) -> None:
        return None


async def build(params: dict[str, Any], env: Env) -> Noop:
    return Noop()


INFO = AdapterInfo(
    name="noop",
    description="Does nothing: every check passes, every quota is granted",
    build=build,
    templates=frozenset(
        {"checknothing", "listentry", "quota", "metric", "logentry", "reportnothing"}
    ),
)
