"""denier: answers every check with the configured status, and grants no quota."""

from __future__ import annotations

from typing import Any

from istio.mixersdk import (
    AdapterInfo,
    CheckNothingInstance,
    CheckResult,
    Env,
    ListEntryInstance,
    QuotaArgs,
    QuotaInstance,
    QuotaResult,
)
from istio.mixersdk.builtin import DENIER


class Denier:
    def __init__(self, params: dict[str, Any]) -> None:
        status = params["status"]
        self.result = CheckResult(
            status["code"], status["message"], params["valid_duration"], params["valid_use_count"]
        )

    def handle_check_nothing(self, instance: CheckNothingInstance) -> CheckResult:
        return self.result

    def handle_list_entry(self, instance: ListEntryInstance) -> CheckResult:
        return self.result

    def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        return QuotaResult(0, self.result.valid_duration)

    async def close(self) -> None:
        return None


async def build(params: dict[str, Any], env: Env) -> Denier:
    return Denier(params)


INFO = AdapterInfo(
    name="denier",
    description="Denies every check with a configured status (e.g. code 7, PERMISSION_DENIED)",
    build=build,
    templates=frozenset({"checknothing", "listentry", "quota"}),
    params=DENIER,
)
