"""The adapter SDK: what an adapter declares, and the handler interface for each template.

An adapter is an `AdapterInfo`: its name (the handler kind users write, e.g. `denier`), the
templates it handles, the schema of its params, and `build`, which makes a handler from
checked params. Mixer finds adapters through the entry point group `istio.mixer.adapters`
(see `discovery`), so an adapter is any installed distribution that declares, in its
pyproject.toml:

    [project.entry-points."istio.mixer.adapters"]
    mylist = "my_package.adapter:INFO"

A handler implements, for each template it supports, that template's method below. Each
method may return its result directly (cheap, in-memory work: no task is made for it) or an
awaitable of it (I/O). Mixer calls handlers of one request concurrently and gives each its
own deadline (`mixs server --adapter-timeout`): a handler that raises or is too slow fails
alone, and its failure is reported as that handler's result. Handlers are built once per
config change (a handler whose params did not change is kept, with its state) and closed once
no request uses them any more.

Theory of use for each variety:
- check templates (checknothing, listentry) return a `CheckResult`: OK or a denial status,
  and how long and how many times the answer may be reused by the caller's cache;
- report templates (metric, logentry, reportnothing) get every instance of one Report call in
  one batch and return nothing;
- quota gets one instance and the amount asked, and returns how much it grants.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from istio.expr import Bag, Value, ValueType
from istio.mixersdk.params import NO_PARAMS, Object
from istio.mixersdk.templates import (
    TEMPLATES,
    CheckNothingInstance,
    ListEntryInstance,
    LogEntryInstance,
    MetricInstance,
    QuotaInstance,
    ReportNothingInstance,
)

# google.rpc.Code values adapters use.
OK = 0
INVALID_ARGUMENT = 3
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

DEFAULT_VALID_DURATION = timedelta(seconds=10)
DEFAULT_VALID_USE_COUNT = 10_000


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A check handler's answer. `status_code` is a google.rpc.Code (OK = 0); the caller may
    reuse the answer for `valid_duration` and `valid_use_count` uses."""

    status_code: int = OK
    message: str = ""
    valid_duration: timedelta = DEFAULT_VALID_DURATION
    valid_use_count: int = DEFAULT_VALID_USE_COUNT

    @property
    def ok(self) -> bool:
        return self.status_code == OK


@dataclass(frozen=True, slots=True)
class QuotaArgs:
    """What a Check asks of one quota: `amount` units (all or nothing unless `best_effort`);
    `deduplication_id` is the same when the client retries a call, so a retry is not charged
    twice."""

    quota: str
    amount: int
    best_effort: bool = False
    deduplication_id: str = ""


@dataclass(frozen=True, slots=True)
class QuotaResult:
    """How much was granted (0 when none), for how long the grant holds, and a status (OK, or
    why nothing could be decided)."""

    granted: int
    valid_duration: timedelta = timedelta(0)
    status_code: int = OK
    message: str = ""


@runtime_checkable
class Handler(Protocol):
    """Every handler can be closed (stop background work, release connections)."""

    async def close(self) -> None: ...


@runtime_checkable
class CheckNothingHandler(Protocol):
    def handle_check_nothing(
        self, instance: CheckNothingInstance
    ) -> CheckResult | Awaitable[CheckResult]: ...


@runtime_checkable
class ListEntryHandler(Protocol):
    def handle_list_entry(
        self, instance: ListEntryInstance
    ) -> CheckResult | Awaitable[CheckResult]: ...


@runtime_checkable
class LogEntryHandler(Protocol):
    def handle_log_entry(self, instances: Sequence[LogEntryInstance]) -> Awaitable[None] | None: ...


@runtime_checkable
class MetricHandler(Protocol):
    def handle_metric(self, instances: Sequence[MetricInstance]) -> Awaitable[None] | None: ...


@runtime_checkable
class ReportNothingHandler(Protocol):
    def handle_report_nothing(
        self, instances: Sequence[ReportNothingInstance]
    ) -> Awaitable[None] | None: ...


@runtime_checkable
class QuotaHandler(Protocol):
    def handle_quota(
        self, instance: QuotaInstance, args: QuotaArgs
    ) -> QuotaResult | Awaitable[QuotaResult]: ...


@runtime_checkable
class AttributeProducer(Protocol):
    """Fills in attributes the caller did not send (labels, service, namespace, ...) from
    what it did (an IP address). Runs only when a rule reads one of `AdapterInfo.produces`
    that the request lacks; must not block (answer from memory)."""

    def produce(self, name: str, bag: Bag) -> Value | None: ...


HANDLER_PROTOCOLS: Mapping[str, type] = {
    "checknothing": CheckNothingHandler,
    "listentry": ListEntryHandler,
    "logentry": LogEntryHandler,
    "metric": MetricHandler,
    "quota": QuotaHandler,
    "reportnothing": ReportNothingHandler,
}


@dataclass(frozen=True, slots=True)
class Env:
    """What Mixer gives a handler: its full name (name.kind.namespace), a logger, and the
    Prometheus registry served on the adapters' /metrics port (42422)."""

    handler: str
    logger: logging.Logger
    prometheus_registry: Any = None


Builder = Callable[[dict[str, Any], Env], Awaitable[Handler]]


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """An adapter, as an entry point in `istio.mixer.adapters` names it.

    `templates` are those its handlers implement; `produces` the attributes (with types) it
    produces, when it is an attribute producer; `params` the schema of its handlers' params.
    """

    name: str
    description: str
    build: Builder
    templates: frozenset[str] = frozenset()
    params: Object = NO_PARAMS
    produces: Mapping[str, ValueType] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with this declaration itself (an unknown template, ...)."""
        found = []
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower():
            found.append(f"adapter name {self.name!r} must be a lowercase identifier")
        for template in sorted(self.templates):
            if template not in TEMPLATES:
                found.append(f"adapter {self.name}: unknown template {template!r}")
        if not self.templates and not self.produces:
            found.append(f"adapter {self.name}: handles no template and produces nothing")
        return found


def implements(handler: object, template: str) -> bool:
    """Whether `handler` has the method of `template`'s handler interface."""
    protocol = HANDLER_PROTOCOLS.get(template)
    return protocol is not None and isinstance(handler, protocol)
