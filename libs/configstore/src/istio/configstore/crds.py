"""The CustomResourceDefinitions under which Kubernetes stores every config kind.

`render_crds(DEFAULT_REGISTRY)` is install/kubernetes/crds.yaml, byte for byte: a golden test
keeps the committed file equal to it (`UPDATE_GOLDEN=1` rewrites the file).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from istio.config import Schema, SchemaRegistry

CATEGORY = "istio-io"
HEADER = (
    "# Generated from the config kinds' schemas by istio.configstore.crds; do not edit.\n"
    "# Regenerate: UPDATE_GOLDEN=1 .venv/bin/pytest libs/configstore/tests/test_kube.py -k golden\n"
)
_SHORT_NAME = re.compile(r"^[a-z][a-z0-9]*$")


def crd_name(schema: Schema) -> str:
    """The CRD's metadata.name, e.g. routerules.config.istio.io."""
    return f"{schema.plural}.{schema.group}"


def custom_resource_definition(schema: Schema) -> dict[str, Any]:
    """One kind's CRD (apiextensions.k8s.io/v1). The spec is kept as written: the store
    validates it against the kind's protobuf schema, which says more than OpenAPI could."""
    names: dict[str, Any] = {
        "kind": schema.kind,
        "listKind": f"{schema.kind}List",
        "plural": schema.plural,
        "singular": schema.kind.lower(),
        "categories": [CATEGORY],
    }
    short_names = [alias for alias in schema.aliases if _SHORT_NAME.match(alias)]
    if short_names:
        names["shortNames"] = short_names
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name(schema), "labels": {"istio": schema.category}},
        "spec": {
            "group": schema.group,
            "names": names,
            "scope": "Namespaced",
            "versions": [
                {
                    "name": schema.version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crds(registry: SchemaRegistry) -> str:
    """Every kind's CRD as one multi-document YAML file, sorted by CRD name."""
    crds = [custom_resource_definition(s) for s in sorted(registry, key=crd_name)]
    return HEADER + yaml.safe_dump_all(
        crds, sort_keys=False, default_flow_style=False, explicit_start=True
    )
