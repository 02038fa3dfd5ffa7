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
    InstanceBuilder,
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


class _Rule:
    """A rule as requests use it: its handlers' methods looked up once per config, not per
    call."""

    __slots__ = ("check", "key", "match", "report", "spec")

    def __init__(self, spec: RuleSpec, handlers: Mapping[str, Any]) -> None:
        self.spec = spec
        self.key = spec.key
        self.match = spec.match.evaluate if spec.match is not None else None
        # (handler key, the handler's method for the template, instance builders)
        self.check: tuple[tuple[str, Callable[..., Any], tuple[InstanceBuilder, ...]], ...] = tuple(
            (d.handler, _method(handlers[d.handler], d.template), d.instances) for d in spec.check
        )
        # ((handler key, template): the batch it adds to, handler key, method, builders)
        self.report: tuple[
            tuple[tuple[str, str], str, Callable[..., Any], tuple[InstanceBuilder, ...]], ...
        ] = tuple(
            (
                (d.handler, d.template),
                d.handler,
                _method(handlers[d.handler], d.template),
                d.instances,
            )
            for d in spec.report
        )


def _method(handler: Any, template: str) -> Callable[..., Any]:
    method: Callable[..., Any] = getattr(handler, TEMPLATES[template].handler_method)
    return method


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
        self._selection: dict[tuple[str, bool], tuple[_Rule, ...]] = {}
        self._compiled: dict[int, _Rule] = {}  # id(RuleSpec) -> its _Rule
        # Quota name (lowercase; the instance's full or short name) -> where it is charged:
        # (the rule, its handler key, the handler's handle_quota, the instance builder).
        self.quota_index: dict[str, list[tuple[_Rule, str, Callable[..., Any], Any]]] = {}
        for by_namespace in plan.rules.values():
            for spec in (*by_namespace[0], *by_namespace[1]):
                rule = self._compiled[id(spec)] = _Rule(spec, handlers)
                for dispatch in spec.quota:
                    charge = handlers[dispatch.handler].handle_quota
                    for builder in dispatch.instances:
                        for name in {builder.name.lower(), builder.name.split(".", 1)[0].lower()}:
                            self.quota_index.setdefault(name, []).append(
                                (rule, dispatch.handler, charge, builder)
                            )
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

    def rules(self, namespace: str, tcp: bool) -> tuple[_Rule, ...]:
        """The rules of the default config namespace, then those of `namespace`."""
        key = (namespace, tcp)
        found = self._selection.get(key)
        if found is None:
            plan = self.plan
            specs = plan.rules.get(plan.default_namespace, ((), ()))[tcp]
            if namespace != plan.default_namespace:
                specs += plan.rules.get(namespace, ((), ()))[tcp]
            found = self._selection[key] = tuple(self._compiled[id(spec)] for spec in specs)
        return found

    def select(self, bag: Bag) -> tuple[_Rule, ...]:
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
            tracking = TrackingBag(
                attributes if isinstance(attributes, MapBag) else MapBag(attributes)
            )
            bag: Bag = ProducedBag(tracking, active.producers) if active.producers else tracking
            rules = self._matching(active.select(bag), bag)
            results: list[tuple[str, Any]] = []
            pending: dict[asyncio.Future[Any], int] = {}
            failures: list[CheckResult] = []
            for rule in rules:
                for handler_key, method, builders in rule.check:
                    for builder in builders:
                        instance = self._instance(builder, bag)
                        if instance is None:
                            failures.append(
                                CheckResult(
                                    INTERNAL,
                                    f"{builder.name}: cannot be built from the request's "
                                    "attributes",
                                    timedelta(0),
                                    1,
                                )
                            )
                            continue
                        self._start(results, pending, handler_key, method, instance)
            if pending:
                await self._settle(results, pending)
            status, message = OK, ""
            valid_duration, use_count = self.default_valid_duration, DEFAULT_VALID_USE_COUNT
            for handler_key, result in results:
                if not isinstance(result, CheckResult):
                    result = CheckResult(UNAVAILABLE, str(result), timedelta(0), 1)
                if status == OK and result.status_code != OK:
                    status, message = result.status_code, f"{handler_key}:{result.message}"
                if result.valid_duration < valid_duration:
                    valid_duration = result.valid_duration
                if result.valid_use_count < use_count:
                    use_count = result.valid_use_count
            for failure in failures:
                if status == OK:
                    status, message = failure.status_code, failure.message
                valid_duration, use_count = timedelta(0), 1
            granted: dict[str, QuotaResult] = {}
            if quotas:
                charged, names, pending = self._charge(
                    active, rules, bag, quotas, deduplication_id, status == OK, granted
                )
                if pending:
                    await self._settle(charged, pending)
                for name, (_, outcome) in zip(names, charged, strict=True):
                    if not isinstance(outcome, QuotaResult):
                        outcome = QuotaResult(0, timedelta(0), UNAVAILABLE, str(outcome))
                    previous = granted.get(name)
                    if previous is None or outcome.granted < previous.granted:
                        granted[name] = outcome
            return CheckOutcome(
                status,
                message,
                min(valid_duration, self.max_valid_duration),
                use_count,
                tracking.asked(),
                granted,
            )
        finally:
            active.leave()

    def _matching(self, rules: Sequence[_Rule], bag: Bag) -> list[_Rule]:
        matched = []
        for rule in rules:
            match = rule.match
            if match is not None:
                try:
                    if not match(bag):
                        continue
                except EvaluationError as error:
                    log.debug("rule %s does not apply: %s", rule.key, error)
                    self.metrics.match_errors.labels(rule.key).inc()
                    continue
            matched.append(rule)
        return matched

    def _instance(
        self, builder: InstanceBuilder, bag: Bag, memo: dict[str, Any] | None = None
    ) -> Any:
        """The instance, or None (counted) when the bag does not allow one. A Report shares
        `memo` among a bag's instances (see InstanceBuilder.build); a Check's few instances
        seldom share a field, and build without."""
        try:
            return builder.build(bag, memo)
        except EvaluationError as error:
            self._instance_failed(builder, error)
            return None

    def _instance_failed(self, builder: InstanceBuilder, error: EvaluationError) -> None:
        log.debug("instance %s: %s", builder.name, error)
        self.metrics.instance_errors.labels(builder.name).inc()

    def _charge(
        self,
        active: Active,
        rules: Sequence[_Rule],
        bag: Bag,
        quotas: Mapping[str, QuotaRequest],
        deduplication_id: str,
        allowed: bool,
        granted: dict[str, QuotaResult],
    ) -> tuple[list[tuple[str, Any]], list[str], dict[asyncio.Future[Any], int]]:
        """Ask the quota handlers of the matching rules for each quota asked: their answers
        as `_start` gives them, and the quota each is for. What needs no handler goes in
        `granted` (everything is refused when a check failed; a quota nothing limits is
        granted in full)."""
        charged: list[tuple[str, Any]] = []  # (handler key, answer), in call order
        names: list[str] = []
        pending: dict[asyncio.Future[Any], int] = {}
        for name, asked in quotas.items():
            if not allowed:
                granted[name] = QuotaResult(0, timedelta(0))
                continue
            calls = len(charged)
            for rule, handler_key, charge, builder in active.quota_index.get(name.lower(), ()):
                if rule not in rules:
                    continue
                instance = self._instance(builder, bag)
                if instance is None:
                    continue
                args = QuotaArgs(name, asked.amount, asked.best_effort, deduplication_id)
                self._start(charged, pending, handler_key, charge, instance, args)
                names.append(name)
            if len(charged) == calls:
                granted[name] = QuotaResult(asked.amount, self.default_valid_duration)
        return charged, names, pending

    # Report.

    async def report(self, records: Sequence[dict[str, Value]]) -> None:
        active = self.active
        active.enter()
        try:
            # (handler key, template) -> (handler key, its method, the instances for it)
            batches: dict[tuple[str, str], tuple[str, Callable[..., Any], list[Any]]] = {}
            producers = active.producers
            for attributes in records:
                bag: Bag = attributes if isinstance(attributes, MapBag) else MapBag(attributes)
                if producers:
                    bag = ProducedBag(bag, producers)
                memo: dict[str, Any] = {}
                for rule in self._matching(active.select(bag), bag):
                    for batch_key, handler_key, method, builders in rule.report:
                        batch = batches.get(batch_key)
                        if batch is None:
                            batch = batches[batch_key] = (handler_key, method, [])
                        instances = batch[2]
                        for builder in builders:
                            try:  # as _instance does, inline: four times per record here
                                instances.append(builder.build(bag, memo))
                            except EvaluationError as error:
                                self._instance_failed(builder, error)
            results: list[tuple[str, Any]] = []
            pending: dict[asyncio.Future[Any], int] = {}
            for handler_key, method, instances in batches.values():
                if instances:
                    self._start(results, pending, handler_key, method, instances)
            if pending:
                await self._settle(results, pending)
        finally:
            active.leave()

    # Calling handlers.

    def _start(
        self,
        results: list[tuple[str, Any]],
        pending: dict[asyncio.Future[Any], int],
        handler_key: str,
        method: Callable[..., Any],
        *args: Any,
    ) -> None:
        """Call a handler and append (handler key, its answer, or the failure as a string) to
        `results`; an answer still to come goes in `pending` (by its place in `results`) for
        `_settle`. Calls that answer at once cost no task."""
        try:
            value = method(*args)
        except Exception as error:
            results.append((handler_key, self._failed(handler_key, "error", error)))
            return
        if not isinstance(value, _ANSWERS) and inspect.isawaitable(value):
            pending[asyncio.ensure_future(value)] = len(results)
            results.append((handler_key, None))
        else:
            results.append((handler_key, value))

    async def _settle(
        self, results: list[tuple[str, Any]], pending: dict[asyncio.Future[Any], int]
    ) -> None:
        """Wait for the pending answers, with one deadline, `adapter_timeout`, for all: late
        ones are cancelled and count as failed. Each lands in its place in `results`."""
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
            error = future.exception()
            results[pending[future]] = (
                handler_key,
                self._failed(handler_key, "error", error) if error is not None else future.result(),
            )
        if late:
            await asyncio.wait(late)

    def _failed(self, handler_key: str, reason: str, error: object) -> str:
        self.metrics.dispatch_errors.labels(handler_key, reason).inc()
        if isinstance(error, BaseException):
            log.warning("handler %s failed: %s: %s", handler_key, type(error).__name__, error)
            return f"handler {handler_key} failed: {type(error).__name__}: {error}"
        log.warning("handler %s: %s", handler_key, error)
        return f"handler {handler_key}: {error}"


# What handlers answer at once: no need to ask whether they are awaitable.
_ANSWERS = (CheckResult, QuotaResult)


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
