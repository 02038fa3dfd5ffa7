"""The params of Mixer's built-in adapters: the contract users write handlers against (what
Istio kept in istio/api's adapter config protos). Mixer's adapters parse their params with
these schemas, and `istioctl validate` checks handlers with them without loading Mixer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType

from istio.mixersdk.params import (
    NO_PARAMS,
    Bool,
    Double,
    Duration,
    Enum,
    Field,
    Int,
    List,
    Map,
    Object,
    Str,
)

_STATUS = Object(
    Field(
        "code",
        Int(minimum=0, maximum=16),
        default=9,
        doc="google.rpc.Code; 9 is FAILED_PRECONDITION",
    ),
    Field("message", Str(), default="denied by Mixer"),
)

DENIER = Object(
    Field("status", _STATUS, doc="the status every check gets"),
    Field("valid_duration", Duration(), default=timedelta(seconds=5)),
    Field("valid_use_count", Int(minimum=0), default=1000),
)

LISTCHECKER = Object(
    Field("provider_url", Str(), default="", doc="where to fetch the list: one entry per line"),
    Field(
        "refresh_interval", Duration(minimum=timedelta(seconds=1)), default=timedelta(seconds=60)
    ),
    Field(
        "ttl", Duration(), default=timedelta(seconds=300), doc="how long a fetched list stays valid"
    ),
    Field("caching_interval", Duration(), default=timedelta(seconds=300)),
    Field("caching_use_count", Int(minimum=0), default=10_000),
    Field("overrides", List(Str()), doc="entries always in the list"),
    Field(
        "entry_type",
        Enum(("STRINGS", "CASE_INSENSITIVE_STRINGS", "IP_ADDRESSES")),
        default="STRINGS",
    ),
    Field("blacklist", Bool(), default=False),
)

_MEMQUOTA_OVERRIDE = Object(
    Field("dimensions", Map(Str())),
    Field("max_amount", Int(minimum=0), required=True),
    Field("valid_duration", Duration(), default=None),
)

MEMQUOTA = Object(
    Field(
        "quotas",
        List(
            Object(
                Field("name", Str(), required=True, doc="the quota instance's name"),
                Field("max_amount", Int(minimum=0), required=True),
                Field("valid_duration", Duration(), default=timedelta(0), doc="window; 0: none"),
                Field("overrides", List(_MEMQUOTA_OVERRIDE)),
            )
        ),
    ),
    Field("min_deduplication_duration", Duration(), default=timedelta(seconds=1)),
)

REDISQUOTA = Object(
    Field(
        "quotas",
        List(
            Object(
                Field("name", Str(), required=True),
                Field("max_amount", Int(minimum=1), required=True),
                Field("valid_duration", Duration(minimum=timedelta(milliseconds=1)), required=True),
                Field("bucket_duration", Duration(), default=timedelta(0)),
                Field(
                    "rate_limit_algorithm",
                    Enum(("FIXED_WINDOW", "ROLLING_WINDOW")),
                    default="FIXED_WINDOW",
                ),
                Field(
                    "overrides",
                    List(
                        Object(
                            Field("dimensions", Map(Str())),
                            Field("max_amount", Int(minimum=0), required=True),
                        )
                    ),
                ),
            )
        ),
    ),
    Field("redis_server_url", Str(), required=True, doc="host:port or redis://host:port/db"),
    Field("connection_pool_size", Int(minimum=1), default=10),
)

_BUCKETS = Object(
    Field(
        "linear_buckets",
        Object(
            Field("num_finite_buckets", Int(minimum=1), required=True),
            Field("width", Double(minimum=0, exclusive_minimum=True), required=True),
            Field("offset", Double(), default=0.0),
        ),
        default=None,
    ),
    Field(
        "exponential_buckets",
        Object(
            Field("num_finite_buckets", Int(minimum=1), required=True),
            Field("growth_factor", Double(minimum=1, exclusive_minimum=True), required=True),
            Field("scale", Double(minimum=0, exclusive_minimum=True), required=True),
        ),
        default=None,
    ),
    Field("explicit_buckets", Object(Field("bounds", List(Double()), required=True)), default=None),
    one_of=(("linear_buckets", "exponential_buckets", "explicit_buckets"),),
)

PROMETHEUS = Object(
    Field(
        "metrics",
        List(
            Object(
                Field("name", Str(pattern=r"[a-zA-Z_:][a-zA-Z0-9_:]*"), required=True),
                Field("instance_name", Str(), required=True, doc="the metric instance (full name)"),
                Field("description", Str(), default=""),
                Field("kind", Enum(("GAUGE", "COUNTER", "DISTRIBUTION"), (1, 2, 3)), required=True),
                Field("buckets", _BUCKETS, default=None),
                Field("label_names", List(Str(pattern=r"[a-zA-Z_][a-zA-Z0-9_]*"))),
            )
        ),
    ),
)

_LEVEL = Enum(("INFO", "WARNING", "ERROR"))

STDIO = Object(
    Field("log_stream", Enum(("STDERR", "STDOUT", "FILE")), default="STDERR"),
    Field("output_path", Str(), default="", doc="the file, for log_stream FILE"),
    Field("severity_levels", Map(_LEVEL), doc="a logentry's severity -> level"),
    Field("metric_level", _LEVEL, default="INFO"),
    Field("output_as_json", Bool(), default=False),
)

STATSD = Object(
    Field("address", Str(), default="localhost:8125"),
    Field("prefix", Str(), default=""),
    Field("flush_duration", Duration(), default=timedelta(milliseconds=300)),
    Field("flush_bytes", Int(minimum=0), default=512),
    Field("sampling_rate", Double(minimum=0, exclusive_minimum=True), default=1.0),
    Field(
        "metrics",
        Map(
            Object(
                Field("name_template", Str(), default="", doc="e.g. {{.source}}.requests"),
                Field("type", Enum(("COUNTER", "GAUGE", "DISTRIBUTION"), (1, 2, 3)), required=True),
            )
        ),
    ),
)

KUBERNETES = Object(
    Field("registry", Str(), default="", doc="file:DIR: the ServiceEntry files Pilot reads"),
    Field("source_ip_input_name", Str(), default="source.ip"),
    Field("destination_ip_input_name", Str(), default="destination.ip"),
    Field("pod_label_for_app", Str(), default="app"),
)

HANDLER_PARAMS: Mapping[str, Object] = MappingProxyType(
    {
        "denier": DENIER,
        "listchecker": LISTCHECKER,
        "memquota": MEMQUOTA,
        "redisquota": REDISQUOTA,
        "prometheus": PROMETHEUS,
        "stdio": STDIO,
        "statsd": STATSD,
        "noop": NO_PARAMS,
        "kubernetes": KUBERNETES,
    }
)
"""Built-in adapter name (the handler kind) -> the schema of its params."""
