"""The mesh's configuration model: typed objects, their kinds, parsing and validation.

Everything here is pure (no I/O): stores, Pilot, Mixer and istioctl build on it.
"""

from istio.config.errors import AlreadyExists, ConfigError, Conflict, NotFound, Problem
from istio.config.model import Config, ConfigKey, ConfigMeta
from istio.config.parse import parse_documents, parse_object, to_object
from istio.config.schema import DEFAULT_REGISTRY, Schema, SchemaRegistry

__all__ = [
    "DEFAULT_REGISTRY",
    "AlreadyExists",
    "Config",
    "ConfigError",
    "ConfigKey",
    "ConfigMeta",
    "Conflict",
    "NotFound",
    "Problem",
    "Schema",
    "SchemaRegistry",
    "parse_documents",
    "parse_object",
    "to_object",
]
