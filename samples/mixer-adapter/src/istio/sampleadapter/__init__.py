"""prefixlist: a sample Mixer adapter, written against the adapter SDK alone.

A `listentry` instance's value passes when it starts with one of `prefixes` (for example, a
request path under /api/ or /health); anything else is denied with `status_code`. Configure it
as any adapter:

    apiVersion: config.istio.io/v1alpha2
    kind: prefixlist
    metadata: {name: paths, namespace: istio-system}
    spec:
      prefixes: [/api/, /health]
      statusCode: 7
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: listentry
    metadata: {name: path, namespace: istio-system}
    spec: {value: request.path}
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: rule
    metadata: {name: onlyapi, namespace: istio-system}
    spec:
      actions: [{handler: paths.prefixlist, instances: [path.listentry]}]

The adapter is this module's INFO, named by the entry point in pyproject.toml; `mixs build
--adapter samples/mixer-adapter --out DIR` makes a Mixer that includes it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from istio.mixersdk import AdapterInfo, CheckResult, Env, Field, ListEntryInstance, Object
from istio.mixersdk.params import Duration, Int, List, Str
from istio.mixersdk.render import text

PARAMS = Object(
    Field("prefixes", List(Str()), doc="values starting with one of these pass"),
    Field("status_code", Int(minimum=1, maximum=16), default=7, doc="google.rpc.Code to deny with"),
    Field("valid_duration", Duration(), default=timedelta(seconds=10)),
)


class PrefixList:
    """The handler: one per configured prefixlist object."""

    def __init__(self, params: dict[str, Any], env: Env) -> None:
        self.prefixes = tuple(params["prefixes"])
        self.status_code: int = params["status_code"]
        self.valid_duration: timedelta = params["valid_duration"]
        self.name = env.handler

    def handle_list_entry(self, instance: ListEntryInstance) -> CheckResult:
        value = text(instance.value)
        if value.startswith(self.prefixes):
            return CheckResult(valid_duration=self.valid_duration)
        return CheckResult(
            self.status_code,
            f"{value} starts with none of {', '.join(self.prefixes) or 'no prefixes'}",
            self.valid_duration,
        )

    async def close(self) -> None:
        return None


async def build(params: dict[str, Any], env: Env) -> PrefixList:
    return PrefixList(params, env)


INFO = AdapterInfo(
    name="prefixlist",
    description="Sample adapter: allows listentry values that start with a configured prefix",
    build=build,
    templates=frozenset({"listentry"}),
    params=PARAMS,
)
