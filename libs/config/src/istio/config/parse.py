"""Multi-document YAML/JSON to Config objects and back, every problem named precisely.

A document looks like a Kubernetes object (apiVersion, kind, metadata, spec). apiVersion may be
left out, and namespace defaults to the caller's, as 0.2's istioctl filled them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import yaml

from istio.config import convert
from istio.config.errors import ConfigError, Problem
from istio.config.model import DEFAULT_NAMESPACE, Config, ConfigMeta
from istio.config.schema import DEFAULT_REGISTRY, SchemaRegistry
from istio.config.validation import validate_labels, validate_object_name

_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
# Set by Kubernetes and other tools; accepted on input and not kept.
_IGNORED_METADATA = {
    "uid",
    "generation",
    "managedFields",
    "selfLink",
    "finalizers",
    "ownerReferences",
    "generateName",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "clusterName",
}


def parse_documents(
    text: str,
    source: str = "<input>",
    *,
    registry: SchemaRegistry = DEFAULT_REGISTRY,
    namespace: str | None = None,
) -> tuple[list[Config], list[Problem]]:
    """Every valid object in `text`, and every problem; a bad document never hides the rest.

    `namespace` overrides nothing: it fills in documents that name none (default "default").
    """
    configs: list[Config] = []
    problems: list[Problem] = []
    loader = yaml.SafeLoader(text)
    document = 0
    try:
        while loader.check_node():
            document += 1
            node = loader.get_node()
            value = loader.construct_document(node) if node is not None else None
            if value is None:
                continue
            try:
                configs.append(parse_object(value, registry=registry, namespace=namespace))
            except ConfigError as error:
                problems.extend(p.located(source=source, document=document) for p in error.problems)
    except yaml.YAMLError as error:
        problems.append(_yaml_problem(error, source))
    finally:
        loader.dispose()
    return configs, problems


def _yaml_problem(error: yaml.YAMLError, source: str) -> Problem:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    reason = getattr(error, "problem", None) or str(error)
    return Problem(f"{where}malformed YAML: {reason}", source=source)


def parse_object(
    value: object,
    *,
    registry: SchemaRegistry = DEFAULT_REGISTRY,
    namespace: str | None = None,
) -> Config:
    """One object (a parsed document); ConfigError lists every problem found."""
    if not isinstance(value, Mapping):
        raise ConfigError(Problem("a document must be a mapping with kind, metadata and spec"))
    kind = value.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(Problem("kind is required", "kind"))
    schema = registry.by_kind(kind)
    if schema is None:
        try:
            resolved = registry.resolve(kind)
        except ConfigError as error:
            raise ConfigError(p.located(field_prefix="kind") for p in error.problems) from None
        raise ConfigError(Problem(f"unknown kind {kind!r}; did you mean {resolved.kind}?", "kind"))

    metadata = value.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, Mapping) else None
    name = raw_name if isinstance(raw_name, str) else ""
    problems: list[Problem] = []
    for key in value:
        if key not in _TOP_LEVEL:
            problems.append(Problem(f"unknown field {key!r}", str(key)))
    api_version = value.get("apiVersion", schema.api_version)
    if api_version != schema.api_version:
        problems.append(
            Problem(
                f"{kind} needs apiVersion {schema.api_version}, got {api_version!r}", "apiVersion"
            )
        )
    meta, meta_problems = _metadata(metadata, kind, schema.api_version, namespace)
    problems += meta_problems

    spec = schema.message()
    # An empty `spec:` reads as null; 0.2 treated it as {} (checknothing instances have none).
    raw_spec = value.get("spec")
    fill_problems = convert.fill_message({} if raw_spec is None else raw_spec, spec, "spec")
    problems += fill_problems
    if not fill_problems:
        problems += (p.located(field_prefix="spec") for p in schema.validate(spec))
    where = f"{meta.namespace}/{name}" if name else ""
    if problems:
        raise ConfigError(p.located(kind=kind, name=where) for p in problems)
    return Config(meta, spec)


def _metadata(
    metadata: object, kind: str, api_version: str, namespace: str | None
) -> tuple[ConfigMeta, list[Problem]]:
    problems: list[Problem] = []
    if not isinstance(metadata, Mapping):
        problems.append(Problem("metadata with a name is required", "metadata"))
        metadata = {}
    known = {
        "name",
        "namespace",
        "labels",
        "annotations",
        "resourceVersion",
        "creationTimestamp",
        *_IGNORED_METADATA,
    }
    for key in metadata:
        if key not in known:
            problems.append(Problem(f"unknown field {key!r}", f"metadata.{key}"))
    name = metadata.get("name", "")
    if not isinstance(name, str):
        problems.append(Problem("name must be a string", "metadata.name"))
        name = ""
    reason = validate_object_name(name)
    if reason:
        problems.append(Problem(reason, "metadata.name"))
    object_namespace = metadata.get("namespace") or namespace or DEFAULT_NAMESPACE
    if not isinstance(object_namespace, str) or validate_object_name(object_namespace):
        problems.append(Problem(f"invalid namespace {object_namespace!r}", "metadata.namespace"))
        object_namespace = DEFAULT_NAMESPACE
    labels = _string_map(metadata.get("labels"), "metadata.labels", problems)
    annotations = _string_map(metadata.get("annotations"), "metadata.annotations", problems)

    problems += validate_labels(labels, "metadata.labels")
    resource_version = metadata.get("resourceVersion", "")
    if isinstance(resource_version, int) and not isinstance(resource_version, bool):
        resource_version = str(resource_version)
    if not isinstance(resource_version, str):
        problems.append(Problem("resourceVersion must be a string", "metadata.resourceVersion"))
        resource_version = ""
    created = _timestamp(metadata.get("creationTimestamp"), problems)
    meta = ConfigMeta(
        kind=kind,
        api_version=api_version,
        name=name,
        namespace=object_namespace,
        labels=labels,
        annotations=annotations,
        resource_version=resource_version,
        creation_timestamp=created,
    )
    return meta, problems


def _string_map(value: object, path: str, problems: list[Problem]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(Problem("expected a mapping of strings", path))
        return {}
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            problems.append(Problem(f"{key!r}: keys and values must be strings", path))
            continue
        result[key] = item
    return result


def _timestamp(value: object, problems: list[Problem]) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    problems.append(Problem("expected an RFC 3339 time", "metadata.creationTimestamp"))
    return None


def to_object(config: Config, *, with_status_fields: bool = True) -> dict[str, Any]:
    """The document form of a config, as `istioctl get -o yaml` prints and stores keep it.

    `with_status_fields=False` leaves out what the store sets (resourceVersion, creation time),
    for writing an object back as a user would.
    """
    meta = config.meta
    metadata: dict[str, Any] = {"name": meta.name, "namespace": meta.namespace}
    if meta.labels:
        metadata["labels"] = dict(sorted(meta.labels.items()))
    if meta.annotations:
        metadata["annotations"] = dict(sorted(meta.annotations.items()))
    if with_status_fields:
        if meta.resource_version:
            metadata["resourceVersion"] = meta.resource_version
        if meta.creation_timestamp is not None:
            metadata["creationTimestamp"] = meta.creation_timestamp.astimezone(UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
    return {
        "apiVersion": meta.api_version,
        "kind": meta.kind,
        "metadata": metadata,
        "spec": convert.message_to_value(config.spec),
    }


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """Documents as block-style YAML, keys in the order given, `---` between them."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    pass
