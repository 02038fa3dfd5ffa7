"""The Mixer adapter SDK and Mixer's config contracts.

- `adapter`: AdapterInfo (what an adapter declares), the handler interface per template,
  CheckResult / QuotaArgs / QuotaResult, and Env;
- `templates`: the six templates, their instance dataclasses, and compiling an instance
  config's expressions into a builder;
- `params`: the schema language for handler params, `builtin`: the built-in adapters' params;
- `discovery`: adapters installed as entry points in `istio.mixer.adapters`.

Pure but for discovery (which imports installed plugins): no I/O, no asyncio.
"""

from istio.mixersdk.adapter import (
    DEFAULT_VALID_DURATION,
    DEFAULT_VALID_USE_COUNT,
    AdapterInfo,
    AttributeProducer,
    CheckNothingHandler,
    CheckResult,
    Env,
    Handler,
    ListEntryHandler,
    LogEntryHandler,
    MetricHandler,
    QuotaArgs,
    QuotaHandler,
    QuotaResult,
    ReportNothingHandler,
    implements,
)
from istio.mixersdk.discovery import GROUP, discover
from istio.mixersdk.params import Field, Object, ParamProblem, parse_params
from istio.mixersdk.templates import (
    TEMPLATES,
    CheckNothingInstance,
    InstanceBuilder,
    ListEntryInstance,
    LogEntryInstance,
    MetricInstance,
    QuotaInstance,
    ReportNothingInstance,
    Template,
    Variety,
    compile_instance,
)

__all__ = [
    "DEFAULT_VALID_DURATION",
    "DEFAULT_VALID_USE_COUNT",
    "GROUP",
    "TEMPLATES",
    "AdapterInfo",
    "AttributeProducer",
    "CheckNothingHandler",
    "CheckNothingInstance",
    "CheckResult",
    "Env",
    "Field",
    "Handler",
    "InstanceBuilder",
    "ListEntryHandler",
    "ListEntryInstance",
    "LogEntryHandler",
    "LogEntryInstance",
    "MetricHandler",
    "MetricInstance",
    "Object",
    "ParamProblem",
    "QuotaArgs",
    "QuotaHandler",
    "QuotaInstance",
    "QuotaResult",
    "ReportNothingHandler",
    "ReportNothingInstance",
    "Template",
    "Variety",
    "compile_instance",
    "discover",
    "implements",
    "parse_params",
]
