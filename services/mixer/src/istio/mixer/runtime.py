"""Live config and per-request dispatch.

Theory of operation. `Runtime.update(configs)` builds a Plan (pure, see config.py); when it is
sound, builds the handlers it needs (reusing every live handler whose adapter and params did
not change, so quota counters and fetched lists survive), and swaps one reference: requests
that started before keep the `Active` they began with, and the handlers only the old config
used are closed once its last request has finished. A plan with problems, or a handler that
fails to build, changes nothing: the problems are returned (and logged and counted by the
caller) and the last good config stays in force.

A Check evaluates, through a TrackingBag, the rules of the default config namespace and of the
destination's namespace (HTTP or TCP rules, from context.protocol), builds the instances of the
matching rules' check actions and calls their handlers concurrently; then, when every check
passed, the quota actions for the quotas asked. Each handler call may answer at once or return
an awaitable; awaitables get one deadline, `adapter_timeout`, after which they are cancelled
and count as failed. Attribute producers (configured in the default namespace) are asked only
when a rule reads an attribute the request lacks, and what they read is tracked too, so the
referenced attributes always name what the client sent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from istio.config import Config, Problem
from istio.expr import AttributeAbsent, Bag, EvaluationError, MapBag, Reference, TrackingBag
from istio.expr.types import Value
from istio.mixer.config import (
    DEFAULT_CONFIG_NAMESPACE,
    Dispatch,
    HandlerSpec,
    Plan,
    RuleSpec,
    build_plan,
)
from istio.mixer.metrics import MixerMetrics
from istio.mixersdk import (
    DEFAULT_VALID_DURATION,
    DEFAULT_VALID_USE_COUNT,
    TEMPLATES,
    AdapterInfo,
    CheckResult,
    Env,
    QuotaArgs,
    QuotaResult,
    implements,
)
from istio.mixersdk.adapter import INTERNAL, OK, UNAVAILABLE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    amount: int
    best_effort: bool = False


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """A Check's answer; `asked` is what it read (TrackingBag.asked), `references` the same
    as Reference records."""

    status_code: int
    message: str
    valid_duration: timedelta
    valid_use_count: int
    asked: tuple[tuple[tuple[str, str | None], bool], ...]
    quotas: Mapping[str, QuotaResult] = field(default_factory=dict)

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(Reference(name, key, present) for (name, key), present in self.asked)


class ProducedBag:
    """`inner`'s attributes, and for those it lacks, what the attribute producers make of it.

    Producers read `inner` (a TrackingBag in Check), so a produced attribute is referenced by
    what it was produced from."""

    __slots__ = ("_inner", "_producers")

    def __init__(self, inner: Bag, producers: Mapping[str, Sequence[Any]]) -> None:
        self._inner = inner
        self._producers = producers

    def _produce(self, name: str) -> Value | None:
        for producer in self._producers.get(name, ()):
            value: Value | None = producer.produce(name, self._inner)
            if value is not None:
                return value
        return None

    def get(self, name: str, /) -> Value | None:
        value = self._inner.get(name)
        if value is None and name in self._producers:
            return self._produce(name)
        return value

    def get_key(self, name: str, key: str, /) -> str | None:
        try:
            return self._inner.get_key(name, key)
        except AttributeAbsent:
            produced = self._produce(name) if name in self._producers else None
            if not isinstance(produced, Mapping):
                raise
            found = produced.get(key)
            return None if found is None else str(found)


class Active:
    """One config in force: its plan, its live handlers, and the requests using it."""

    def __init__(self, plan: Plan, handlers: Mapping[str, Any], generation: int) -> None:
        self.plan = plan
        self.handlers = handlers
        self.generation = generation
        self.in_flight = 0
        self.retired = False
        self.drained = asyncio.Event()
        self.producers: dict[str, tuple[Any, ...]] = {
            name: tuple(handlers[key] for key in keys) for name, keys in plan.producers.items()
        }
        self._selection: dict[tuple[str, bool], tuple[RuleSpec, ...]] = {}
        # Quota name (lowercase; the instance's full or short name) -> where it is charged.
        self.quota_index: dict[str, list[tuple[RuleSpec, Dispatch, Any]]] = {}
        for by_namespace in plan.rules.values():
            for rule in (*by_namespace[0], *by_namespace[1]):
                for dispatch in rule.quota:
                    for builder in dispatch.instances:
                        for name in {builder.name.lower(), builder.name.split(".", 1)[0].lower()}:
                            self.quota_index.setdefault(name, []).append((rule, dispatch, builder))
        # What selection must read: only what some rule depends on, so that the referenced
        # attributes (the client's cache key) stay as few as the config allows.
        self._has_tcp = any(tcp for _, tcp in plan.rules.values())
        self._has_namespaced = any(ns != plan.default_namespace for ns in plan.rules)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.drained.set()

    def rules(self, namespace: str, tcp: bool) -> tuple[RuleSpec, ...]:
        """The rules of the default config namespace, then those of `namespace`."""
        key = (namespace, tcp)
        found = self._selection.get(key)
        if found is None:
            plan = self.plan
            found = plan.rules.get(plan.default_namespace, ((), ()))[tcp]
            if namespace != plan.default_namespace:
                found += plan.rules.get(namespace, ((), ()))[tcp]
            self._selection[key] = found
        return found

    def select(self, bag: Bag) -> tuple[RuleSpec, ...]:
        tcp = self._has_tcp and bag.get("context.protocol") == "tcp"
        namespace = destination_namespace(bag) if self._has_namespaced else ""
        if namespace not in self.plan.rules:
            namespace = ""  # no rules of its own: keeps the selection cache bounded
        return self.rules(namespace, tcp)


def destination_namespace(bag: Bag) -> str:
    """destination.namespace, else the second label of destination.service
    (ratings.default.svc.cluster.local -> default)."""
    namespace = bag.get("destination.namespace")
    if isinstance(namespace, str) and namespace:
        return namespace
    service = bag.get("destination.service")
    if isinstance(service, str):
        parts = service.split(".")
        if len(parts) >= 2:
            return parts[1]
    return ""


_Call = tuple[str, Callable[[], Any]]  # (handler key, the call)


class Runtime:
    """The config in force and the dispatch of Check and Report calls through it."""

    def __init__(
        self,
        adapters: Mapping[str, AdapterInfo],
        metrics: MixerMetrics,
        *,
        default_namespace: str = DEFAULT_CONFIG_NAMESPACE,
        adapter_timeout: float = 1.0,
        default_valid_duration: timedelta = DEFAULT_VALID_DURATION,
        max_valid_duration: timedelta = DEFAULT_VALID_DURATION,
        prometheus_registry: Any = None,
    ) -> None:
        self.adapters = adapters
        self.metrics = metrics
        self.default_namespace = default_namespace
        self.adapter_timeout = adapter_timeout
        self.default_valid_duration = min(default_valid_duration, max_valid_duration)
        self.max_valid_duration = max_valid_duration
        self.prometheus_registry = prometheus_registry
        empty, _ = build_plan((), adapters, default_namespace=default_namespace)
        assert empty is not None
        self.active = Active(empty, {}, 0)
        self.last_problems: list[Problem] = []
        self._by_fingerprint: dict[str, Any] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._update_lock = asyncio.Lock()

    # Config.

    async def update(self, configs: Iterable[Config]) -> list[Problem]:
        """Put `configs` in force; the problems (and the old config kept) when it is unsound."""
        async with self._update_lock:
            plan, problems = build_plan(
                configs, self.adapters, default_namespace=self.default_namespace
            )
            if plan is None:
                return self._rejected(problems)
            handlers, built, problems = await self._handlers_for(plan)
            if problems:
                for handler in built:
                    await _close(handler)
                return self._rejected(problems)
            old = self.active
            self.active = Active(plan, handlers, old.generation + 1)
            self._by_fingerprint = {
                plan.handlers[key].fingerprint: handler for key, handler in handlers.items()
            }
            kept = {id(h) for h in handlers.values()}
            retired = [h for h in old.handlers.values() if id(h) not in kept]
            self._retire(old, retired)
            self.last_problems = []
            metrics = self.metrics
            metrics.config_loads.labels("accepted").inc()
            metrics.config_rejected.set(0)
            metrics.config_problems.set(0)
            metrics.config_generation.set(self.active.generation)
            for kind, count in plan.counts.items():
                metrics.config_objects.labels(kind).set(count)
            return []

    def _rejected(self, problems: list[Problem]) -> list[Problem]:
        self.last_problems = problems
        self.metrics.config_loads.labels("rejected").inc()
        self.metrics.config_rejected.set(1)
        self.metrics.config_problems.set(len(problems))
        return problems

    async def _handlers_for(self, plan: Plan) -> tuple[dict[str, Any], list[Any], list[Problem]]:
        handlers: dict[str, Any] = {}
        built: list[Any] = []
        problems: list[Problem] = []
        for key, spec in plan.handlers.items():
            live = self._by_fingerprint.get(spec.fingerprint)
            if live is not None:
                handlers[key] = live
                continue
            try:
                handler = await self._build(spec)
            except Exception as error:  # an adapter's failure to start rejects the config
                problems.append(_handler_problem(spec, f"cannot start: {error}"))
                continue
            built.append(handler)
            handlers[key] = handler
            missing = [t for t in spec.adapter.templates if not implements(handler, t)]
            if missing:
                problems.append(
                    _handler_problem(
                        spec,
                        f"adapter {spec.adapter.name} built a handler without "
                        + ", ".join(TEMPLATES[t].handler_method + "()" for t in sorted(missing)),
                    )
                )
        return handlers, built, problems

    async def _build(self, spec: HandlerSpec) -> Any:
        env = Env(
            handler=spec.key,
            logger=logging.getLogger(f"istio.mixer.adapter.{spec.adapter.name}"),
            prometheus_registry=self.prometheus_registry,
        )
        return await spec.adapter.build(dict(spec.params), env)

    def _retire(self, old: Active, handlers: list[Any]) -> None:
        old.retired = True
        if old.in_flight == 0:
            old.drained.set()
        if not handlers:
            return

        async def close_when_drained() -> None:
            await old.drained.wait()
            for handler in handlers:
                await _close(handler)

        task = asyncio.create_task(close_when_drained(), name="mixer-retire-handlers")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every handler (after the requests in flight)."""
        self._retire(self.active, list(self.active.handlers.values()))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # Check.

    async def check(
        self,
        attributes: dict[str, Value],
        quotas: Mapping[str, QuotaRequest] | None = None,
        deduplication_id: str = "",
    ) -> CheckOutcome:
        active = self.active
        active.enter()
        try:
            return await self._check(active, attributes, quotas or {}, deduplication_id)
        finally:
            active.leave()

    async def _check(
        self,
        active: Active,
        attributes: dict[str, Value],
        quotas: Mapping[str, QuotaRequest],
        deduplication_id: str,
    ) -> CheckOutcome:
        tracking = TrackingBag(attributes if isinstance(attributes, MapBag) else MapBag(attributes))
        bag: Bag = ProducedBag(tracking, active.producers) if active.producers else tracking
        rules = self._matching(active.select(bag), bag)
        calls: list[_Call] = []
        failures: list[CheckResult] = []
        for rule in rules:
            for dispatch in rule.check:
                handler = active.handlers[dispatch.handler]
                method = getattr(handler, TEMPLATES[dispatch.template].handler_method)
                for builder in dispatch.instances:
                    instance = self._instance(builder, bag)
                    if instance is None:
                        failures.append(
                            CheckResult(
                                INTERNAL,
                                f"{builder.name}: cannot be built from the request's attributes",
                                timedelta(0),
                                1,
                            )
                        )
                        continue
                    calls.append((dispatch.handler, _bind(method, instance)))
        results = await self._run(calls)
        status, message = OK, ""
        valid_duration, use_count = self.default_valid_duration, DEFAULT_VALID_USE_COUNT
        for handler_key, result in results:
            if not isinstance(result, CheckResult):
                result = CheckResult(UNAVAILABLE, str(result), timedelta(0), 1)
            if status == OK and result.status_code != OK:
                status, message = result.status_code, f"{handler_key}:{result.message}"
            valid_duration = min(valid_duration, result.valid_duration)
            use_count = min(use_count, result.valid_use_count)
        for failure in failures:
            if status == OK:
                status, message = failure.status_code, failure.message
            valid_duration, use_count = timedelta(0), 1
        quota_results: dict[str, QuotaResult] = {}
        if quotas:
            quota_results = await self._quotas(
                active, rules, bag, quotas, deduplication_id, status == OK
            )
        return CheckOutcome(
            status,
            message,
            min(valid_duration, self.max_valid_duration),
            use_count,
            tracking.asked(),
            quota_results,
        )

    def _matching(self, rules: Sequence[RuleSpec], bag: Bag) -> list[RuleSpec]:
        matched = []
        for rule in rules:
            if rule.match is not None:
                try:
                    if not rule.match.evaluate(bag):
                        continue
                except EvaluationError as error:
                    log.debug("rule %s does not apply: %s", rule.key, error)
                    self.metrics.match_errors.labels(rule.key).inc()
                    continue
            matched.append(rule)
        return matched

    def _instance(self, builder: Any, bag: Bag) -> Any:
        try:
            return builder.build(bag)
        except EvaluationError as error:
            log.debug("instance %s: %s", builder.name, error)
            self.metrics.instance_errors.labels(builder.name).inc()
            return None

    async def _quotas(
        self,
        active: Active,
        rules: Sequence[RuleSpec],
        bag: Bag,
        quotas: Mapping[str, QuotaRequest],
        deduplication_id: str,
        allowed: bool,
    ) -> dict[str, QuotaResult]:
        results: dict[str, QuotaResult] = {}
        calls: dict[str, list[_Call]] = {}
        matched = {id(rule) for rule in rules}
        for name, asked in quotas.items():
            if not allowed:
                results[name] = QuotaResult(0, timedelta(0))
                continue
            for rule, dispatch, builder in active.quota_index.get(name.lower(), ()):
                if id(rule) not in matched:
                    continue
                instance = self._instance(builder, bag)
                if instance is None:
                    continue
                handler = active.handlers[dispatch.handler]
                args = QuotaArgs(name, asked.amount, asked.best_effort, deduplication_id)
                calls.setdefault(name, []).append(
                    (dispatch.handler, _bind(handler.handle_quota, instance, args))
                )
            if name not in calls:
                # No quota is configured for it: nothing limits it.
                results[name] = QuotaResult(asked.amount, self.default_valid_duration)
        flat = [(name, call) for name, group in calls.items() for call in group]
        outcomes = await self._run([call for _, call in flat])
        for (name, _), (_, outcome) in zip(flat, outcomes, strict=True):
            if not isinstance(outcome, QuotaResult):
                outcome = QuotaResult(0, timedelta(0), UNAVAILABLE, str(outcome))
            previous = results.get(name)
            if previous is None or outcome.granted < previous.granted:
                results[name] = outcome
        return results

    # Report.

    async def report(self, records: Sequence[dict[str, Value]]) -> None:
        active = self.active
        active.enter()
        try:
            batches: dict[tuple[str, str], list[Any]] = {}
            for attributes in records:
                bag: Bag = attributes if isinstance(attributes, MapBag) else MapBag(attributes)
                if active.producers:
                    bag = ProducedBag(bag, active.producers)
                for rule in self._matching(active.select(bag), bag):
                    for dispatch in rule.report:
                        batch = batches.setdefault((dispatch.handler, dispatch.template), [])
                        for builder in dispatch.instances:
                            instance = self._instance(builder, bag)
                            if instance is not None:
                                batch.append(instance)
            calls: list[_Call] = []
            for (handler_key, template), instances in batches.items():
                if instances:
                    method = getattr(
                        active.handlers[handler_key], TEMPLATES[template].handler_method
                    )
                    calls.append((handler_key, _bind(method, instances)))
            await self._run(calls)
        finally:
            active.leave()

    # Calling handlers.

    async def _run(self, calls: Sequence[_Call]) -> list[tuple[str, Any]]:
        """Every call's result (or the failure, as a string), in order. Calls that answer at
        once cost no task; awaitables share one deadline and are cancelled after it."""
        results: list[tuple[str, Any]] = []
        pending: dict[asyncio.Future[Any], int] = {}
        for handler_key, call in calls:
            try:
                value = call()
            except Exception as error:
                results.append((handler_key, self._failed(handler_key, "error", error)))
                continue
            if inspect.isawaitable(value):
                pending[asyncio.ensure_future(value)] = len(results)
                results.append((handler_key, None))
            else:
                results.append((handler_key, value))
        if pending:
            done, late = await asyncio.wait(pending, timeout=self.adapter_timeout)
            for future in late:
                future.cancel()
                handler_key = results[pending[future]][0]
                results[pending[future]] = (
                    handler_key,
                    self._failed(handler_key, "timeout", f"no answer in {self.adapter_timeout}s"),
                )
            for future in done:
                handler_key = results[pending[future]][0]
                failure = future.exception()
                results[pending[future]] = (
                    handler_key,
                    self._failed(handler_key, "error", failure)
                    if failure is not None
                    else future.result(),
                )
            if late:
                await asyncio.wait(late)
        return results

    def _failed(self, handler_key: str, reason: str, error: object) -> str:
        self.metrics.dispatch_errors.labels(handler_key, reason).inc()
        if isinstance(error, BaseException):
            log.warning("handler %s failed: %s: %s", handler_key, type(error).__name__, error)
            return f"handler {handler_key} failed: {type(error).__name__}: {error}"
        log.warning("handler %s: %s", handler_key, error)
        return f"handler {handler_key}: {error}"


def _bind(method: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: method(*args)


def _handler_problem(spec: HandlerSpec, message: str) -> Problem:
    name, kind, namespace = spec.key.split(".", 2)
    return Problem(message, kind=kind, name=f"{namespace}/{name}")


async def _close(handler: Any) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(handler, "close", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("closing handler %r failed", handler)
